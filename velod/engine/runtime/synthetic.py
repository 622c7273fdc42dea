"""The model interface the engine drives, and a synthetic model that exercises the attention path.

**The synthetic model is not a language model.** It has no weights and produces no text.
For each token it derives query, key and value vectors from a counter-based hash of
(token id, position, layer, q/k/v, element), so they are deterministic and reproducible on
any backend, and its "next token" is a fixed hash of the last token and its position. What
it gives is a workload: every byte of the attention path (cache writes, block tables, paged
attention over every layer, preemption and recompute, prefix reuse, copy-on-write) runs for
real and can be checked against a dense recomputation (:func:`dense_attention`).

A real runner (weights from a GGUF file) plugs in through :class:`Model`: per step the
engine calls ``begin_step`` with the scheduled tokens, then for each layer asks for
``layer_qkv`` and hands back the attention output with ``layer_output`` (a real model feeds
it to its projection and MLP to make the next layer's input), then ``sample``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from velod.engine.settings import SYNTHETIC_KIND as KIND
from velod.kernels.layout import from_float32, to_float32

VOCAB_SIZE = 32000
QUERY_GAIN = 4.0  # a power of two (exact): sharper softmax than uniform [-1, 1) queries give

_M1, _M2, _M3 = 0x9E3779B1, 0x85EBCA77, 0x27D4EB2F
_MASK = 0xFFFFFFFF


class Model(Protocol):
    """What the engine asks of a model, step by step. Arrays live on the backend's device."""

    name: str
    kind: str
    vocab_size: int

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray) -> None:
        """The flat tokens of this step (int32) and their positions (int32)."""

    def layer_qkv(self, layer: int) -> tuple[Any, Any, Any]:
        """Query ``[T, heads, head_dim]``, key and value ``[T, kv_heads, head_dim]``."""

    def layer_output(self, layer: int, attention: Any) -> None:
        """The attention output ``[T, heads, head_dim]`` of ``layer`` (None when the engine
        computed none this step: ``prefill_attention="last"`` on a mid-prompt chunk)."""

    def sample(self, sample_indices: np.ndarray) -> np.ndarray:
        """The next token (int32) for each flat token index in ``sample_indices``."""


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer on uint32 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _fmix32_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def salt(seed: int, layer: int, kind: int) -> int:
    """The per-(layer, q/k/v) constant mixed into every vector (kind 0 = q, 1 = k, 2 = v)."""
    return _fmix32_int(seed * 0x01000193 + layer * 4 + kind + 1)


def synthetic_vectors(token_ids: np.ndarray, positions: np.ndarray, width: int, salt_value: int,
                      gain: float = 1.0) -> np.ndarray:
    """float32 ``[T, width]`` in [-gain, gain): the same numbers the CUDA generator makes."""
    tokens = np.asarray(token_ids).astype(np.uint32)
    pos = np.asarray(positions).astype(np.uint32)
    seeds = _fmix32(tokens * np.uint32(_M1)
                    ^ _fmix32(pos * np.uint32(_M2) + np.uint32(salt_value)))
    elements = np.arange(width, dtype=np.uint32) * np.uint32(_M3)
    bits = _fmix32(seeds[:, None] ^ elements[None, :])
    values = (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)
    if gain != 1.0:
        values *= np.float32(gain)
    return values


def next_tokens(token_ids: np.ndarray, positions: np.ndarray, seed: int) -> np.ndarray:
    """The synthetic "sampler": a hash of the last token and its position, in [0, VOCAB)."""
    tokens = np.asarray(token_ids).astype(np.uint32)
    pos = np.asarray(positions).astype(np.uint32)
    mixed = _fmix32(tokens * np.uint32(_M1) ^ pos * np.uint32(_M2) ^ np.uint32(seed & _MASK))
    return (mixed % np.uint32(VOCAB_SIZE)).astype(np.int32)


class SyntheticModel:
    """Deterministic q/k/v from (token, position, layer): see the module docstring."""

    kind = KIND
    vocab_size = VOCAB_SIZE

    def __init__(self, heads: int, kv_heads: int, head_dim: int, dtype: np.dtype,
                 backend: Any = None, seed: int = 0) -> None:
        self.name = "synthetic"
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.backend = backend
        self._device = _device_generator(self, backend)
        self._tokens = np.zeros(0, np.int32)
        self._positions = np.zeros(0, np.int32)

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray) -> None:
        self._tokens, self._positions = token_ids, positions
        if self._device is not None:
            self._device.begin_step(token_ids, positions)

    def layer_qkv(self, layer: int) -> tuple[Any, Any, Any]:
        if self._device is not None:
            return self._device.layer_qkv(tuple(salt(self.seed, layer, kind)
                                                for kind in range(3)), QUERY_GAIN)
        return self.host_qkv(self._tokens, self._positions, layer)

    def host_qkv(self, token_ids: np.ndarray, positions: np.ndarray,
                 layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q, k, v of ``layer`` for these tokens as host arrays in the cache dtype."""
        count = len(token_ids)
        dim = self.head_dim
        q = synthetic_vectors(token_ids, positions, self.heads * dim, salt(self.seed, layer, 0),
                              QUERY_GAIN)
        k = synthetic_vectors(token_ids, positions, self.kv_heads * dim,
                              salt(self.seed, layer, 1))
        v = synthetic_vectors(token_ids, positions, self.kv_heads * dim,
                              salt(self.seed, layer, 2))
        return (from_float32(q.reshape(count, self.heads, dim), self.dtype),
                from_float32(k.reshape(count, self.kv_heads, dim), self.dtype),
                from_float32(v.reshape(count, self.kv_heads, dim), self.dtype))

    def layer_output(self, layer: int, attention: Any) -> None:
        return None  # no projection or MLP: the next layer's q/k/v do not depend on it

    def close(self) -> None:
        """Frees device buffers (the CUDA generator's); the model is unusable afterwards."""
        if self._device is not None:
            self._device.close()
            self._device = None

    def sample(self, sample_indices: np.ndarray) -> np.ndarray:
        return next_tokens(self._tokens[sample_indices], self._positions[sample_indices],
                           self.seed)


def dense_attention(model: SyntheticModel, token_ids: np.ndarray, positions: list[int],
                    layer: int) -> np.ndarray:
    """Causal attention recomputed densely (no cache, no blocks) for one sequence.

    ``token_ids`` is the whole sequence; returns float32 ``[len(positions), heads, head_dim]``,
    the output at each asked position over tokens ``0..position``, from q/k/v rounded to the
    cache dtype exactly as the engine stores them.
    """
    last = max(positions) + 1
    tokens = np.asarray(token_ids[:last], dtype=np.int32)
    q, k, v = (to_float32(a) for a in model.host_qkv(tokens, np.arange(last, dtype=np.int32),
                                                      layer))
    group = model.heads // model.kv_heads
    scale = np.float32(1.0 / np.sqrt(model.head_dim))
    out = np.empty((len(positions), model.heads, model.head_dim), np.float32)
    for i, p in enumerate(positions):
        keys = np.repeat(k[: p + 1], group, axis=1)  # [n, heads, d]
        values = np.repeat(v[: p + 1], group, axis=1)
        scores = np.einsum("hd,nhd->hn", q[p] * scale, keys)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[i] = np.einsum("hn,nhd->hd", weights, values)
    return out


def _device_generator(model: SyntheticModel, backend: Any) -> Any:
    """The GPU generator of q/k/v when the backend's arrays live on a device, else None."""
    if backend is None or not backend.on_device:
        return None
    from velod.kernels.synthetic import DeviceGenerator

    return DeviceGenerator(backend, model.heads, model.kv_heads, model.head_dim, model.dtype)
