"""A model ready to serve text: its weights, tokenizer and chat template, loaded together.

:func:`load_served` reads the GGUF once (blocking: call it through ``run_blocking``) and
returns a :class:`ServedModel`, which the generation layer uses to turn requests into token
ids and tokens back into text, and the engine runs step by step (on the host the NumPy
model, on a GPU the CUDA runner: ``velod.engine.runtime.engine.load_language_model``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velod.engine.models.chat import ChatTemplate
    from velod.engine.models.protocol import LanguageModel
    from velod.engine.models.tokenizer import Tokenizer
    from velod.engine.settings import EngineSettings
    from velod.model.metadata import Geometry


@dataclass
class ServedModel:
    """A loaded model: ``name`` is what it was loaded as (an Ollama name or a path)."""

    name: str
    model: LanguageModel
    tokenizer: Tokenizer
    template: ChatTemplate
    loaded_at: float = field(default_factory=time.time)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def geometry(self) -> Geometry:
        """The attention shape the engine's KV pool is sized for (windowed layers too)."""
        from velod.engine.runtime.engine import model_geometry

        return model_geometry(self.model)

    @property
    def path(self) -> str:
        """The file the weights came from."""
        return str(getattr(self.model, "info", {}).get("path", self.name))

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


def load_served(settings: EngineSettings, *, chat_template: str | None = None
                ) -> ServedModel:
    """The language model ``settings.model`` names (an Ollama name or a GGUF path) with its
    tokenizer and chat template, for the device and KV cache ``settings`` say; blocking.

    The memory for the weights is estimated first (with engine.kv_cache kept for the pool).
    Raises ModelFileError / NotEnoughMemory / PoolError (the file, the model, the device),
    TokenizerError or ChatTemplateError (its vocabulary or template): each names what is
    wrong. ``chat_template`` (a built-in's name or a Jinja file) replaces the file's.
    """
    from velod.engine.models.chat import load_chat_template
    from velod.engine.models.tokenizer import Tokenizer
    from velod.engine.runtime.engine import backend_for, load_language_model

    parts: dict[str, Any] = {}

    def text_side(metadata: dict[str, Any]) -> None:
        # Before the weights: a model whose vocabulary or template is broken fails fast.
        parts["tokenizer"] = Tokenizer.from_gguf_metadata(metadata)
        parts["template"] = load_chat_template(metadata, chat_template)

    model = load_language_model(settings, backend_for(settings), on_metadata=text_side)
    return ServedModel(settings.model, model, parts["tokenizer"], parts["template"])
