"""Real models for the engine: GGUF weights dequantized to float32 and a transformer forward.

``load_model("gemma3:270m")`` (an Ollama name, resolved through Ollama's store) or
``load_model("/path/model.gguf")`` returns a :class:`TransformerModel` that plugs into the
engine step (see ``velod.engine.models.protocol``). Blocking: call it from a worker thread.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velod.engine.models.transformer import TransformerModel

# Imported on first use (PEP 562): importing a light module of this package (the tokenizer)
# must not load NumPy and the whole forward.
_EXPORTS = {
    "ARCHITECTURES": "velod.engine.models.hparams", "HParams": "velod.engine.models.hparams",
    "UnsupportedModel": "velod.engine.models.hparams",
    "LanguageModel": "velod.engine.models.protocol",
    "LayerAttention": "velod.engine.models.protocol",
    "layer_attention": "velod.engine.models.protocol",
    "FORMATS": "velod.engine.models.quants",
    "UnsupportedQuantization": "velod.engine.models.quants",
    "TransformerModel": "velod.engine.models.transformer",
    "NotEnoughMemory": "velod.engine.models.weights",
    "ModelFileError": "velod.model.gguf",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

__all__ = [
    "ARCHITECTURES",
    "FORMATS",
    "HParams",
    "LanguageModel",
    "LayerAttention",
    "ModelFileError",
    "NotEnoughMemory",
    "TransformerModel",
    "UnsupportedModel",
    "UnsupportedQuantization",
    "layer_attention",
    "load_model",
    "quantization_label",
]


def quantization_label(metadata: dict[str, Any]) -> str | None:
    """The file's quantization as llama.cpp names it (``Q4_K_M``), from general.file_type."""
    file_type = metadata.get("general.file_type")
    if not isinstance(file_type, int):
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {file_type}"


def load_model(source: str | Path, *, dtype: Any = "float32", available: int | None = None,
               reserve: int = 0,
               on_metadata: Callable[[dict[str, Any]], None] | None = None) -> TransformerModel:
    """The model named by ``source`` with its weights in memory; ``dtype`` is its KV cache's
    element type.

    ``on_metadata`` gets the file's metadata before the weights load (the tokenizer and
    chat template come from it, without opening the file twice).
    Raises ModelFileError (not found, not a GGUF, truncated, unsupported architecture or
    quantization) or NotEnoughMemory (with the figures; ``reserve`` bytes are kept for the
    KV pool), never a half-loaded model.
    """
    import numpy as np

    from velod.engine.models.hparams import open_model
    from velod.engine.models.tokenizer import end_of_generation_ids
    from velod.engine.models.transformer import TransformerModel
    from velod.engine.models.weights import load_weights

    with open_model(str(source), on_metadata) as (found, gguf, hp):
        weights = load_weights(gguf, hp, available=available, reserve=reserve)
        info = {"path": str(found.path), "quantization": quantization_label(gguf.metadata),
                "digest": found.digest}
        metadata = gguf.metadata
    storage = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
    return TransformerModel(hp, weights, dtype=storage.get(str(dtype), dtype),
                            source=str(source), info=info, metadata=metadata,
                            eog_ids=end_of_generation_ids(metadata))
