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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from velod.model.gguf import ModelFileError
from velod.model.metadata import Geometry, UnknownArchitecture

if TYPE_CHECKING:
    from velod.model.gguf import GGUFFile
    from velod.model.store import ResolvedModel


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
    swa_rope_base: float = 0.0    # RoPE base of windowed layers (0: the model's)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", rope="norm", activation="silu"),
    "qwen2": Architecture("qwen2", rope="neox", activation="silu"),
    # llama.cpp: rope_freq_base_train_swa = 10000 (llama-model.cpp); which layers are windowed
    # is the Geometry's reading (velod.model.metadata: set_swa_pattern(6) for gemma3)
    "gemma3": Architecture("gemma3", rope="neox", activation="gelu_tanh", qk_norm=True,
                           post_norms=True, embed_scale=True, swa_rope_base=10000.0),
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
    """A model's shape (its :class:`~velod.model.metadata.Geometry`, the one reading of layers,
    heads, key/value lengths, context and sliding windows) and what only the forward pass
    needs: the architecture's traits, feed-forward width, norm epsilon, per-layer RoPE and
    softmax scale, biases, a tied output."""

    arch: Architecture
    name: str
    geometry: Geometry
    vocab_size: int
    ffn: int
    rms_eps: float
    layer_specs: tuple[LayerSpec, ...] = field(repr=False)
    tied_output: bool = False
    qkv_bias: bool = False

    @property
    def hidden(self) -> int:
        return self.geometry.embedding_length

    @property
    def layers(self) -> int:
        return self.geometry.layers

    @property
    def heads(self) -> int:
        return self.geometry.heads

    @property
    def kv_heads(self) -> int:
        return self.geometry.kv_heads

    @property
    def head_dim(self) -> int:
        return self.geometry.key_length

    @property
    def context_length(self) -> int:
        return self.geometry.context_length

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


def _geometry(metadata: Mapping[str, Any], meta: _Meta, vocab: int) -> Geometry:
    """The model's :class:`Geometry`, with the checks the forward pass adds: one value for
    every layer, equal key and value lengths, the vocabulary of the embedding."""
    for key in ("attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "feed_forward_length"):
        if meta.get(key) is not None:
            meta.int(key)  # per-layer lists must be uniform: UnsupportedModel otherwise
    try:
        geometry = Geometry.from_metadata({**metadata, f"{meta.arch}.vocab_size": vocab})
    except UnknownArchitecture as exc:
        raise ModelFileError(meta.path, exc.reason) from None
    if geometry.key_length != geometry.value_length:
        raise UnsupportedModel(meta.path, f"key length {geometry.key_length} differs from "
                               f"value length {geometry.value_length}; velod's KV cache needs "
                               "them equal")
    return geometry


def read_hparams(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                 path: str = "model") -> HParams:
    """Every size and constant of the model in ``metadata``; ModelFileError / UnsupportedModel
    naming what is missing, malformed or unsupported."""
    arch = architecture_of(metadata, path)
    meta = _Meta(metadata, arch.name, path)
    embedding = tensor_shapes.get("token_embd.weight")
    hidden = meta.int("embedding_length")
    if embedding is None or len(embedding) != 2 or embedding[1] != hidden:
        raise ModelFileError(path, f"token_embd.weight has shape {embedding}, expected "
                             f"(vocab, {hidden})")
    g = _geometry(metadata, meta, int(embedding[0]))
    head_dim = g.key_length
    rope_dims = meta.int("rope.dimension_count", head_dim)
    if rope_dims > head_dim or rope_dims % 2:
        raise ModelFileError(path, f"rope.dimension_count {rope_dims} must be even and at "
                             f"most the head size {head_dim}")
    base = meta.float("rope.freq_base", 10000.0)
    factors = "rope_freqs.weight" in tensor_shapes
    global_rope = Rope(rope_dims, base, _rope_scale(meta), arch.rope, factors)
    window_rope = Rope(rope_dims, meta.float("rope.freq_base_swa", arch.swa_rope_base or base),
                       1.0, arch.rope, factors) if g.windowed_layers else global_rope
    if arch.name == "gemma3" and g.layers == 62:  # llama.cpp: the 27B scales by hidden / heads
        scale = 1.0 / math.sqrt(hidden / g.heads)
    else:
        scale = 1.0 / math.sqrt(head_dim)
    scale = float(metadata.get(f"{arch.name}.attention.scale", scale))
    specs = tuple(LayerSpec(g.sliding_window, scale, window_rope) if g.is_windowed(i)
                  else LayerSpec(None, scale, global_rope) for i in range(g.layers))
    name = metadata.get("general.name")
    return HParams(
        arch=arch, name=name if isinstance(name, str) else arch.name, geometry=g,
        vocab_size=int(embedding[0]), ffn=meta.int("feed_forward_length"),
        rms_eps=meta.float("attention.layer_norm_rms_epsilon"), layer_specs=specs,
        tied_output="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes)


@contextmanager
def open_model(source: str, on_metadata: Callable[[dict[str, Any]], None] | None = None
               ) -> Iterator[tuple[ResolvedModel, GGUFFile, HParams]]:
    """The GGUF file of ``source`` (an Ollama name or a path), open, and its hyperparameters;
    closed on leaving. ``on_metadata`` gets the file's metadata once they are read (before
    any weight is). Raises what ``resolve``, ``open_gguf`` and ``read_hparams`` raise."""
    from velod.model.gguf import open_gguf
    from velod.model.store import resolve

    found = resolve(str(source))
    gguf = open_gguf(found.path)
    try:
        shapes = {name: info.shape for name, info in gguf.tensors.items()}
        hp = read_hparams(gguf.metadata, shapes, str(found.path))
        if on_metadata is not None:
            on_metadata(gguf.metadata)
        yield found, gguf, hp
    finally:
        gguf.close()


def describe_model(model: Any, **extra: Any) -> dict[str, Any]:
    """What ``engine status`` shows of a loaded model (``model``: its name, kind, source, hp,
    weights and info): architecture, sizes, weights, then ``extra`` and the file's info."""
    hp: HParams = model.hp
    return {"name": model.name, "kind": model.kind, "architecture": hp.arch.name,
            "source": model.source, "layers": hp.layers, "hidden": hp.hidden,
            "heads": hp.heads, "kv_heads": hp.kv_heads, "head_dim": hp.head_dim,
            "vocab_size": hp.vocab_size, "context_length": hp.context_length,
            "sliding_window": next((s.window for s in hp.layer_specs if s.window), None),
            "weights": dict(model.weights.info), **extra, **model.info}
