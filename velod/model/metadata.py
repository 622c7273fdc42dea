"""A model's attention shape, read from its metadata: a GGUF header or Ollama's ``/api/show``.

Ollama's ``model_info`` map *is* the GGUF metadata (``<arch>.block_count``,
``<arch>.attention.head_count_kv``, ...), so one reader serves both. :class:`Geometry` holds
what sizes a KV cache and shapes attention: layers, query and KV heads, key and value
lengths, the trained context, and which layers attend through a sliding window.

Sliding windows follow llama.cpp (``src/llama-hparams.cpp``, ``set_swa_pattern``): with a
period ``n``, layer ``il`` is windowed when ``il % n < n - 1`` (the last layer of each period
attends to everything; ``n = 0`` windows every layer). The period comes from
``<arch>.attention.sliding_window_pattern`` (a period, or one flag per layer, true =
windowed) when the GGUF
states it, else from the architecture as llama.cpp hard-codes it (Gemma 2: 2, Gemma 3: 6,
Gemma 3n: 5, Cohere 2: 4). A window size without a known pattern is taken as full attention:
the estimate then errs on the large side, never the small one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Architectures whose windowed layers llama.cpp sets by a fixed period (set_swa_pattern).
SWA_PERIODS: dict[str, int] = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}


class GeometryError(ValueError):
    """A shape that cannot be used; ``field`` names the value at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownArchitecture(ValueError):
    """A model's metadata lacks the fields needed to size its KV cache."""

    def __init__(self, reason: str, architecture: str | None = None) -> None:
        self.reason = reason
        self.architecture = architecture
        where = f" ({architecture})" if architecture else ""
        super().__init__(f"cannot size the KV cache of this model{where}: {reason}")


@dataclass(frozen=True)
class Geometry:
    """The attention shape that decides a model's KV cache and attention calls.

    ``windowed`` holds one flag per layer (True = sliding window of ``sliding_window``
    tokens); empty means every layer attends to the whole context.
    """

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    embedding_length: int
    context_length: int
    vocab_size: int | None = None  # sizes the output logits buffer; None = unknown
    sliding_window: int = 0
    windowed: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        for key in ("layers", "heads", "kv_heads", "key_length", "value_length",
                    "embedding_length", "context_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GeometryError(key, f"must be a positive integer, got {value!r}")
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise GeometryError("kv_heads", f"{self.kv_heads} must divide heads ({self.heads})")
        if self.windowed and len(self.windowed) != self.layers:
            raise GeometryError("windowed", f"{len(self.windowed)} flags for {self.layers} "
                                "layers")
        if any(self.windowed) and self.sliding_window <= 0:
            raise GeometryError("sliding_window", "windowed layers need a window size")

    @classmethod
    def attention_only(cls, layers: int, heads: int, kv_heads: int, head_dim: int,
                       context_length: int, architecture: str = "custom") -> Geometry:
        """A shape given by its attention alone (synthetic workloads, kernel benchmarks)."""
        return cls(architecture=architecture, layers=layers, heads=heads, kv_heads=kv_heads,
                   key_length=head_dim, value_length=head_dim,
                   embedding_length=heads * head_dim, context_length=context_length)

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """The one head size of keys and values (GeometryError when they differ)."""
        if self.key_length != self.value_length:
            raise GeometryError("key_length", f"key and value head sizes differ "
                                f"({self.key_length} vs {self.value_length}); the kernels "
                                "need one size")
        return self.key_length

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def has_gqa(self) -> bool:
        """True when several query heads share one key/value head."""
        return self.kv_heads < self.heads

    def is_windowed(self, layer: int) -> bool:
        """True when ``layer`` attends through the sliding window."""
        return bool(self.windowed) and self.windowed[layer]

    @property
    def windowed_layers(self) -> int:
        return sum(self.windowed)

    @property
    def full_layers(self) -> int:
        return self.layers - self.windowed_layers

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Geometry:
        """Read GGUF metadata or ``/api/show``'s ``model_info``; UnknownArchitecture when it
        lacks what the KV size needs."""
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise UnknownArchitecture("model_info has no general.architecture")

        def read(key: str, required: bool = True) -> int | None:
            value = metadata.get(f"{arch}.{key}")
            if value is None:
                if required:
                    raise UnknownArchitecture(f"model_info has no {arch}.{key}", arch)
                return None
            # Some models (e.g. OpenELM, some hybrids) give one value per layer; the largest
            # layer decides the memory we must hold, so we size every layer like it.
            if isinstance(value, list | tuple):
                numbers = [v for v in value if _is_int(v)]
                if not numbers or len(numbers) != len(value):
                    raise UnknownArchitecture(f"{arch}.{key} is not a list of integers: "
                                              f"{_excerpt(value)}", arch)
                value = max(numbers)
            if not _is_int(value) or value < 0:
                raise UnknownArchitecture(f"{arch}.{key} is not a non-negative integer: "
                                          f"{_excerpt(value)}", arch)
            return int(value)

        layers = read("block_count")
        heads = read("attention.head_count")
        embedding = read("embedding_length")
        context = read("context_length")
        kv_heads = read("attention.head_count_kv", required=False)
        assert layers is not None and heads is not None  # required=True
        assert embedding is not None and context is not None
        if kv_heads is None:
            kv_heads = heads  # no GQA: every query head has its own K and V
        if layers == 0 or heads == 0 or embedding == 0 or context == 0:
            raise UnknownArchitecture("block_count, head_count, embedding_length and "
                                      "context_length must be greater than 0", arch)
        if kv_heads == 0 or kv_heads > heads:
            raise UnknownArchitecture(f"head_count_kv {kv_heads} must be between 1 and "
                                      f"head_count {heads}", arch)
        key_length = read("attention.key_length", required=False)
        value_length = read("attention.value_length", required=False)
        key_length = embedding // heads if key_length is None else key_length
        value_length = embedding // heads if value_length is None else value_length
        if key_length == 0 or value_length == 0:
            raise UnknownArchitecture("key_length and value_length must be greater than 0", arch)
        window = read("attention.sliding_window", required=False) or 0
        windowed = _windowed_layers(arch, layers, window,
                                    metadata.get(f"{arch}.attention.sliding_window_pattern"))
        try:
            return cls(architecture=arch, layers=layers, heads=heads, kv_heads=kv_heads,
                       key_length=key_length, value_length=value_length,
                       embedding_length=embedding, context_length=context,
                       vocab_size=read("vocab_size", required=False) or None,
                       sliding_window=window if any(windowed) else 0, windowed=windowed)
        except GeometryError as exc:
            raise UnknownArchitecture(str(exc), arch) from None

    def to_metadata(self) -> dict[str, Any]:
        """The metadata keys this geometry reads back from (as GGUF and ``/api/show`` name
        them)."""
        arch = self.architecture
        out: dict[str, Any] = {
            "general.architecture": arch,
            f"{arch}.block_count": self.layers,
            f"{arch}.attention.head_count": self.heads,
            f"{arch}.attention.head_count_kv": self.kv_heads,
            f"{arch}.attention.key_length": self.key_length,
            f"{arch}.attention.value_length": self.value_length,
            f"{arch}.embedding_length": self.embedding_length,
            f"{arch}.context_length": self.context_length,
            f"{arch}.vocab_size": self.vocab_size,
        }
        if self.sliding_window:
            out[f"{arch}.attention.sliding_window"] = self.sliding_window
            out[f"{arch}.attention.sliding_window_pattern"] = list(self.windowed)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "key_length": self.key_length,
                "value_length": self.value_length, "embedding_length": self.embedding_length,
                "context_length": self.context_length, "vocab_size": self.vocab_size,
                "sliding_window": self.sliding_window or None,
                "windowed_layers": self.windowed_layers}


def swa_pattern(layers: int, period: int) -> tuple[bool, ...]:
    """llama.cpp's ``set_swa_pattern(period)``: which of ``layers`` use the window."""
    return tuple(period == 0 or il % period < period - 1 for il in range(layers))


def _windowed_layers(arch: str, layers: int, window: int, pattern: Any) -> tuple[bool, ...]:
    if window <= 0:
        return ()
    if isinstance(pattern, list | tuple) and pattern and all(
            isinstance(p, bool) or _is_int(p) for p in pattern):
        # GGUF's per-layer form flags the windowed layers (convert_hf_to_gguf writes
        # ``layer_type == "sliding_attention"``), tiled when shorter than the model.
        return tuple(bool(pattern[il % len(pattern)]) for il in range(layers))
    if _is_int(pattern) and not isinstance(pattern, bool) and pattern >= 0:
        return swa_pattern(layers, int(pattern))
    period = SWA_PERIODS.get(arch)
    return swa_pattern(layers, period) if period is not None else ()


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _excerpt(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
