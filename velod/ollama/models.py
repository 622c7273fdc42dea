"""Plain data about an Ollama server: model geometry, installed and loaded models, state.

The I/O layer parses Ollama's JSON (``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``) into these types; the planner reads only these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Bytes per KV-cache element by Ollama's OLLAMA_KV_CACHE_TYPE. q8_0 and q4_0 are GGML block
# types: 32 values share one f16 scale, so a q8_0 block is 32 + 2 bytes and q4_0 16 + 2.
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class UnknownArchitecture(ValueError):
    """A model's ``model_info`` lacks the fields needed to size its KV cache."""

    def __init__(self, reason: str, architecture: str | None = None) -> None:
        self.reason = reason
        self.architecture = architecture
        where = f" ({architecture})" if architecture else ""
        super().__init__(f"cannot size the KV cache of this model{where}: {reason}")


@dataclass(frozen=True)
class Geometry:
    """The attention shape that decides a model's KV-cache size per token."""

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    embedding_length: int
    context_length: int
    vocab_size: int | None = None  # sizes the output logits buffer; None = unknown

    def kv_bytes_per_token(self, cache_type: str = "f16") -> float:
        """Bytes of K and V cache one token takes over all layers, for ``cache_type``."""
        try:
            per_element = KV_BYTES_PER_ELEMENT[cache_type]
        except KeyError:
            known = ", ".join(KV_BYTES_PER_ELEMENT)
            raise ValueError(f"unknown KV cache type {cache_type!r} (known: {known})") from None
        return self.layers * self.kv_heads * (self.key_length + self.value_length) * per_element

    @property
    def has_gqa(self) -> bool:
        """True when several query heads share one key/value head."""
        return self.kv_heads < self.heads

    @classmethod
    def from_model_info(cls, model_info: dict[str, Any]) -> Geometry:
        """Read ``/api/show``'s ``model_info``; raise UnknownArchitecture when it cannot."""
        arch = model_info.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise UnknownArchitecture("model_info has no general.architecture")

        def read(key: str, required: bool = True) -> int | None:
            value = model_info.get(f"{arch}.{key}")
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
                                              f"{value!r}", arch)
                value = max(numbers)
            if not _is_int(value) or value < 0:
                raise UnknownArchitecture(f"{arch}.{key} is not a non-negative integer: "
                                          f"{value!r}", arch)
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
        return cls(architecture=arch, layers=layers, heads=heads, kv_heads=kv_heads,
                   key_length=key_length, value_length=value_length,
                   embedding_length=embedding, context_length=context,
                   vocab_size=read("vocab_size", required=False) or None)

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "key_length": self.key_length,
                "value_length": self.value_length, "embedding_length": self.embedding_length,
                "context_length": self.context_length, "vocab_size": self.vocab_size}


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


@dataclass(frozen=True)
class ModelInfo:
    """An installed model: ``size`` is the bytes of its weights as ``/api/tags`` reports."""

    name: str
    digest: str | None
    size: int
    geometry: Geometry | None
    skip_reason: str | None = None  # why geometry is None (e.g. UnknownArchitecture's text)
    family: str | None = None
    parameter_size: str | None = None  # "8.0B"
    quantization: str | None = None  # "Q4_K_M"


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory per ``/api/ps``; ``size_vram < size`` means part runs on the CPU."""

    name: str
    size: int
    size_vram: int
    context_length: int | None
    expires_at: str | None = None

    @property
    def spills_to_cpu(self) -> bool:
        return self.size_vram < self.size

    @property
    def gpu_fraction(self) -> float:
        """Share of the loaded model held in VRAM (1.0 = all on the GPU)."""
        return self.size_vram / self.size if self.size else 1.0


@dataclass(frozen=True)
class OllamaState:
    """What velod observed of Ollama at one moment; ``reachable=False`` carries ``error``."""

    version: str | None
    models: list[ModelInfo] = field(default_factory=list)
    loaded: list[LoadedModel] = field(default_factory=list)
    reachable: bool = True
    error: str | None = None

    def model(self, name: str) -> ModelInfo | None:
        """The installed model called ``name`` (``llama3.1:8b``; ``:latest`` may be omitted)."""
        wanted = normalize_name(name)
        return next((m for m in self.models if normalize_name(m.name) == wanted), None)


def normalize_name(name: str) -> str:
    """``"llama3"`` and ``"llama3:latest"`` name the same model, as in Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
