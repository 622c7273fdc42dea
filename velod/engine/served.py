"""A model ready to serve text: its weights, tokenizer and chat template, loaded together.

:func:`load_served` reads the GGUF once (blocking: call it through ``run_blocking``) and
returns a :class:`ServedModel`, which the generation layer uses to turn requests into token
ids and tokens back into text, and the engine runs step by step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velod.engine.models.chat import ChatTemplate
    from velod.engine.models.tokenizer import Tokenizer
    from velod.engine.models.transformer import TransformerModel
    from velod.model.metadata import Geometry


@dataclass
class ServedModel:
    """A loaded model: ``name`` is what it was loaded as (an Ollama name or a path)."""

    name: str
    model: TransformerModel
    tokenizer: Tokenizer
    template: ChatTemplate
    loaded_at: float = field(default_factory=time.time)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def geometry(self) -> Geometry:
        """The attention shape the engine's KV pool is sized for."""
        from velod.model.metadata import Geometry

        m = self.model
        return Geometry.attention_only(m.layers, m.heads, m.kv_heads, m.head_dim,
                                       m.context_length, architecture=m.hp.arch.name)

    @property
    def eog_ids(self) -> frozenset[int]:
        """The tokens that end generation (EOS, end of turn, ...)."""
        return self.tokenizer.eog_ids

    def answers_to(self, name: str | None) -> bool:
        """True when a request naming ``name`` means this model (None: whatever is loaded).

        The name it was loaded as, its file's name with or without ``.gguf``, and for an
        Ollama name the form with ``:latest`` all match.
        """
        if not name:
            return True
        # Ollama's clients add the default tag to a name without one.
        return name in self.aliases or name.removesuffix(":latest") in self.aliases

    @property
    def aliases(self) -> tuple[str, ...]:
        names = [self.name]
        path = Path(self.name)
        if path.suffix == ".gguf":
            names += [path.name, path.stem]
        elif ":" not in self.name and "/" not in self.name:
            names.append(f"{self.name}:latest")
        elif self.name.endswith(":latest"):
            names.append(self.name.removesuffix(":latest"))
        return tuple(dict.fromkeys(names))

    def describe(self) -> dict[str, Any]:
        """What ``engine status`` shows about the model: architecture, quantization, memory."""
        info = self.model.describe()
        return {**info, "name": self.name, "display_name": info.get("name"),
                "chat_template": self.template.name, "loaded_at": self.loaded_at,
                "eog_ids": sorted(self.eog_ids)}


def load_served(source: str, *, kv_dtype: str = "float32", chat_template: str | None = None,
                available: int | None = None) -> ServedModel:
    """Loads ``source`` (an Ollama model name or a GGUF path) with its tokenizer and chat
    template; blocking. ``kv_dtype`` is the KV cache's element type.

    Raises ModelFileError / NotEnoughMemory (the file, the model), TokenizerError or
    ChatTemplateError (its vocabulary or template): each names what is wrong.
    """
    from velod.engine.models import load_model
    from velod.engine.models.chat import load_chat_template
    from velod.engine.models.tokenizer import Tokenizer

    parts: dict[str, Any] = {}

    def text_side(metadata: dict[str, Any]) -> None:
        # Before the weights: a model whose vocabulary or template is broken fails fast.
        parts["tokenizer"] = Tokenizer.from_gguf_metadata(metadata)
        parts["template"] = load_chat_template(metadata, chat_template)

    model = load_model(source, dtype=kv_dtype, available=available, on_metadata=text_side)
    return ServedModel(str(source), model, parts["tokenizer"], parts["template"])
