"""The attention geometry the engine serves: named presets of real models, or explicit numbers.

Presets are thin names over :mod:`velod.catalog`, whose entries carry each model's shape and
the ``config.json`` it was read from; this module adds no second table of numbers. A geometry
can also come from Ollama's ``/api/show`` (:func:`from_ollama_show`), so a model runner that
loads GGUF weights can hand the engine the shape of the model it loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any

CUSTOM = "custom"

# Engine preset name -> velod.catalog entry (the catalog comment cites each source).
PRESETS: dict[str, str] = {
    "llama3.2-1b": "llama3.2:1b",
    "llama3.2-3b": "llama3.2:3b",
    "llama3.1-8b": "llama3.1:8b",
    "llama3-8b": "llama3.1:8b",  # Llama 3 and 3.1 8B share the attention shape
    "llama3.1-70b": "llama3.1:70b",
    "qwen2.5-0.5b": "qwen2.5:0.5b",
    "qwen2.5-1.5b": "qwen2.5:1.5b",
    "qwen2.5-3b": "qwen2.5:3b",
    "qwen2.5-7b": "qwen2.5:7b",
    "mistral-7b": "mistral:7b",
    "gemma2-9b": "gemma2:9b",
    "phi3-mini": "phi3:mini",
    "llama2-7b": "llama2:7b",
}


class GeometryError(ValueError):
    """A geometry that the engine cannot serve; the message says which value and why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelGeometry:
    """What sizes the KV cache and the attention calls: one model's attention shape."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context: int
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("layers", "heads", "kv_heads", "head_dim", "max_context"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GeometryError(key, f"must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise GeometryError("kv_heads", f"{self.kv_heads} must divide heads ({self.heads})")
        if self.max_context < 2:
            raise GeometryError("max_context", "must be at least 2 (a prompt and one token)")

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of K and V one token takes over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    def block_bytes(self, block_size: int, itemsize: int) -> int:
        """Bytes of one KV block (``block_size`` tokens, all layers, K and V)."""
        return block_size * self.kv_bytes_per_token(itemsize)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset(name: str) -> ModelGeometry:
    """The geometry of a preset name ("llama3.1-8b"); GeometryError with a hint if unknown."""
    from velod import catalog

    target = PRESETS.get(name)
    if target is None:
        hint = difflib.get_close_matches(name, list(PRESETS), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise GeometryError("engine.model", f"unknown preset {name!r}{extra} (known: "
                            f"{', '.join(sorted(PRESETS))}, or 'custom' with engine.geometry)")
    entry = catalog.CATALOG[target]
    g = entry.geometry
    if g.key_length != g.value_length:
        raise GeometryError("engine.model", f"{name}: key and value head sizes differ "
                            f"({g.key_length} vs {g.value_length}); the kernels need one size")
    return ModelGeometry(name, g.layers, g.heads, g.kv_heads, g.key_length, g.context_length,
                         entry.source)


def from_engine_config(engine: Any) -> ModelGeometry:
    """The geometry ``velod.config.EngineConfig`` asks for (preset or ``custom``)."""
    if engine.model != CUSTOM:
        return preset(engine.model)
    g = engine.geometry
    if g is None:
        raise GeometryError("engine.geometry", "required when engine.model is 'custom'")
    return ModelGeometry(CUSTOM, g.layers, g.heads, g.kv_heads, g.head_dim, g.max_context,
                         "engine.geometry in the config")


def from_ollama_show(model_info: dict[str, Any], name: str = "ollama") -> ModelGeometry:
    """The geometry of a model from Ollama's ``/api/show`` ``model_info`` map.

    Raises GeometryError when the map lacks a field or has different key and value sizes.
    """
    from velod.ollama.models import Geometry, UnknownArchitecture

    try:
        g = Geometry.from_model_info(model_info)
    except UnknownArchitecture as exc:
        raise GeometryError("model_info", exc.reason) from None
    if g.key_length != g.value_length:
        raise GeometryError("model_info", f"key_length {g.key_length} differs from "
                            f"value_length {g.value_length}; the kernels need one head size")
    return ModelGeometry(name, g.layers, g.heads, g.kv_heads, g.key_length, g.context_length,
                         "Ollama /api/show model_info")
