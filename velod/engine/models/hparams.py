"""What a GGUF says about its model: the architecture's traits and every size and constant.

Nothing here is guessed: shapes and constants come from the file's metadata under its
``general.architecture`` prefix (``gemma3.embedding_length``, ...) or from its tensors' shapes,
and where llama.cpp fixes a value in code rather than in the file, :data:`ARCHITECTURES`
records it with the reason. llama.cpp (``src/llama-model.cpp``, ``src/models/*.cpp``,
``convert_hf_to_gguf.py``) is the reference for what the file stores:

- llama: the converter permutes Q and K rows so that rotating *adjacent* pairs (ggml's
  "normal" RoPE) equals Hugging Face's half-split rotation; Llama 3.1+ files carry their
  RoPE frequency scaling as a ``rope_freqs.weight`` tensor (one divisor per frequency).
- qwen2: half-split ("NeoX") RoPE and Q/K/V biases.
- gemma3: NeoX RoPE; the converter already adds Gemma's ``1 +`` to every RMSNorm weight;
  embeddings scaled by sqrt(hidden); q/k RMSNorm per head; GELU(tanh) gating; sliding-window
  layers (5 of every 6, the 6th global) rotate with base 10000 and no frequency scaling;
  queries scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B, as
  llama.cpp does); the output projection is the embedding when ``output.weight`` is absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from velod.model.gguf import ModelFileError


class UnsupportedModel(ModelFileError):
    """A model file velod can read but not run: unknown architecture, a feature it lacks."""


@dataclass(frozen=True)
class Architecture:
    """The traits of one architecture family that its metadata does not spell out."""

    name: str
    rope: str                     # "norm" (adjacent pairs) or "neox" (halves)
    activation: str               # gate activation: "silu" or "gelu_tanh"
    qk_norm: bool = False         # RMSNorm of each q and k head before RoPE
    post_norms: bool = False      # RMSNorm of the attention and MLP outputs before residual
    embed_scale: bool = False     # embeddings x sqrt(hidden)
    swa_period: int = 0           # every swa_period-th layer is global, the rest windowed
    swa_rope_base: float = 0.0    # RoPE base of windowed layers (0: the model's)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", rope="norm", activation="silu"),
    "qwen2": Architecture("qwen2", rope="neox", activation="silu"),
    # llama.cpp: hparams.set_swa_pattern(6), rope_freq_base_train_swa = 10000 (llama-model.cpp)
    "gemma3": Architecture("gemma3", rope="neox", activation="gelu_tanh", qk_norm=True,
                           post_norms=True, embed_scale=True, swa_period=6,
                           swa_rope_base=10000.0),
}


@dataclass(frozen=True)
class Rope:
    """One RoPE table: angle_i(p) = p · scale · base^(-2i/dims) / factor_i."""

    dims: int                 # rotated elements of each head (<= head_dim)
    base: float
    scale: float = 1.0        # linear position scaling (1 / rope.scaling.factor)
    style: str = "neox"
    has_factors: bool = False  # divide each frequency by rope_freqs.weight (Llama 3.1+)


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention: its window (None = full) and the softmax scale."""

    window: int | None
    scale: float
    rope: Rope


@dataclass(frozen=True)
class HParams:
    """Sizes and constants of a model, all read from its GGUF."""

    arch: Architecture
    name: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rms_eps: float
    context_length: int
    layer_specs: tuple[LayerSpec, ...] = field(repr=False)
    tied_output: bool = False
    qkv_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


class _Meta:
    """Typed reads of ``<arch>.<key>`` with errors that name the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, path: str) -> None:
        self.metadata, self.arch, self.path = metadata, arch, path

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, list):  # per-layer arrays: velod needs them uniform
            if not value or len(set(value)) != 1:
                raise UnsupportedModel(self.path, f"{self.arch}.{key} varies by layer "
                                       f"({value[:8]}...); velod needs one value")
            value = value[0]
        if value is None:
            raise ModelFileError(self.path, f"metadata {self.arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelFileError(self.path, f"metadata {self.arch}.{key} = {value!r} is not "
                                 f"an integer >= {minimum}")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default)
        if value is None:
            raise ModelFileError(self.path, f"metadata {self.arch}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or value <= 0:
            raise ModelFileError(self.path, f"metadata {self.arch}.{key} = {value!r} is not "
                                 "a positive number")
        return float(value)


def architecture_of(metadata: Mapping[str, Any], path: str) -> Architecture:
    """The file's architecture, or UnsupportedModel naming the supported ones."""
    name = metadata.get("general.architecture")
    if not isinstance(name, str):
        raise ModelFileError(path, "has no general.architecture; not a model GGUF")
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedModel(path, f"architecture {name!r} is not supported; supported: "
                               f"{', '.join(ARCHITECTURES)}") from None


def _rope_scale(meta: _Meta) -> float:
    """1 / the linear scaling factor, or UnsupportedModel for a scaling velod lacks."""
    kind = meta.get("rope.scaling.type", "none")
    if kind in ("none", None):
        legacy = meta.get("rope.scale_linear")
        return 1.0 / float(legacy) if legacy else 1.0
    if kind == "linear":
        return 1.0 / meta.float("rope.scaling.factor")
    raise UnsupportedModel(meta.path, f"RoPE scaling {kind!r} is not supported (velod does "
                           "none and linear; Llama 3 scaling comes as rope_freqs.weight)")


def _window_layers(arch: Architecture, meta: _Meta, layers: int) -> list[bool]:
    """Which layers use the sliding window."""
    if not arch.swa_period:
        return [False] * layers
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        return [bool(p) for p in pattern]
    period = pattern if isinstance(pattern, int) and pattern > 0 else arch.swa_period
    return [i % period < period - 1 for i in range(layers)]


def read_hparams(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                 path: str = "model") -> HParams:
    """Every size and constant of the model in ``metadata``; ModelFileError / UnsupportedModel
    naming what is missing, malformed or unsupported."""
    arch = architecture_of(metadata, path)
    meta = _Meta(metadata, arch.name, path)
    hidden = meta.int("embedding_length")
    layers = meta.int("block_count")
    heads = meta.int("attention.head_count")
    kv_heads = meta.int("attention.head_count_kv", heads)
    head_dim = meta.int("attention.key_length", hidden // heads)
    value_dim = meta.int("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModel(path, f"key length {head_dim} differs from value length "
                               f"{value_dim}; velod's KV cache needs them equal")
    if heads % kv_heads:
        raise ModelFileError(path, f"{heads} attention heads are not a multiple of "
                             f"{kv_heads} kv heads")
    embedding = tensor_shapes.get("token_embd.weight")
    if embedding is None or len(embedding) != 2 or embedding[1] != hidden:
        raise ModelFileError(path, f"token_embd.weight has shape {embedding}, expected "
                             f"(vocab, {hidden})")
    rope_dims = meta.int("rope.dimension_count", head_dim)
    if rope_dims > head_dim or rope_dims % 2:
        raise ModelFileError(path, f"rope.dimension_count {rope_dims} must be even and at "
                             f"most the head size {head_dim}")
    base = meta.float("rope.freq_base", 10000.0)
    factors = "rope_freqs.weight" in tensor_shapes
    global_rope = Rope(rope_dims, base, _rope_scale(meta), arch.rope, factors)
    window_rope = Rope(rope_dims, meta.float("rope.freq_base_swa", arch.swa_rope_base or base),
                       1.0, arch.rope, factors) if arch.swa_period else global_rope
    windowed = _window_layers(arch, meta, layers)
    window = meta.int("attention.sliding_window") if any(windowed) else None
    if arch.name == "gemma3" and layers == 62:  # llama.cpp: the 27B scales by hidden / heads
        scale = 1.0 / math.sqrt(hidden / heads)
    else:
        scale = 1.0 / math.sqrt(head_dim)
    scale = float(metadata.get(f"{arch.name}.attention.scale", scale))
    specs = tuple(LayerSpec(window if w else None, scale, window_rope if w else global_rope)
                  for w in windowed)
    name = metadata.get("general.name")
    return HParams(
        arch=arch, name=name if isinstance(name, str) else arch.name,
        vocab_size=int(embedding[0]), hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, ffn=meta.int("feed_forward_length"),
        rms_eps=meta.float("attention.layer_norm_rms_epsilon"),
        context_length=meta.int("context_length", 2048), layer_specs=specs,
        tied_output="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes)
