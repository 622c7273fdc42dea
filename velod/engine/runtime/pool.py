"""The KV pool: how many blocks fit, and the per-layer key and value arrays that hold them.

A block holds ``block_size`` tokens of every layer's K and V; its bytes come from the one KV
formula (:func:`velod.model.kv.kv_bytes_per_token`).

A language model with sliding-window layers (Gemma 3: 5 of every 6) gets two pools: blocks of
the full-attention layers, which keep a sequence's whole context, and blocks of the windowed
layers, which a sequence holds only for its window (``velod.engine.core.window_pool``). The
window pool is sized so that it never limits the engine: every sequence of a full batch
holding its window, plus one step's prompt chunks; the full pool gets the rest of the budget.
That is llama.cpp's sizing (``velod.model.kv``: a windowed layer keeps window + micro-batch
cells per slot) with ``max_batch_size`` slots and the step's token budget as the micro-batch
they share. A budget too small for that many windows (and as many full blocks) gets as many
blocks in each pool, which is what one pool over every layer would hold: never less.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from velod.engine.core.errors import EngineError
from velod.engine.settings import EngineSettings
from velod.model.kv import kv_bytes_per_token
from velod.units import format_size

MIN_BLOCKS = 2
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class PoolError(EngineError):
    """The KV pool cannot be allocated as configured; the message says what to change."""


def storage_dtype(name: str) -> np.dtype:
    """The array dtype of a cache element type (bfloat16 travels as uint16 bits)."""
    try:
        return np.dtype(_STORAGE[name])
    except KeyError:
        raise PoolError(f"engine.dtype {name!r} is not one of {', '.join(_STORAGE)}") from None


@dataclass(frozen=True)
class PoolPlan:
    """How big the pool is: blocks of ``block_size`` tokens over every layer, K and V (over
    the full-attention layers only when there is a window pool)."""

    num_blocks: int
    block_bytes: int
    free_bytes: int
    window_blocks: int = 0
    window_block_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes + self.window_blocks * self.window_block_bytes


def block_bytes(settings: EngineSettings, windowed: bool | None = None) -> int:
    """Bytes of one KV block: ``block_size`` tokens of every layer's K and V, or of the
    full-attention (``windowed=False``) or windowed (``True``) layers only."""
    storage_dtype(settings.dtype)  # a clear error for an unknown type
    return int(settings.block_size * kv_bytes_per_token(settings.shape, settings.dtype,
                                                        windowed=windowed))


def window_blocks_wanted(settings: EngineSettings) -> int:
    """Window-pool blocks that never limit the engine: a full batch of sequences each
    holding its window (and the block being filled), plus one step's prompt chunks."""
    size = settings.block_size
    per_sequence = -(-(settings.shape.sliding_window - 1) // size) + 3
    return settings.max_batch_size * per_sequence + -(-settings.max_tokens_per_step // size)


def plan_pool(settings: EngineSettings, free_bytes: int, device: str) -> PoolPlan:
    """Size the pool on a device with ``free_bytes`` free, or raise PoolError."""
    wanted = _budget(settings, free_bytes, device)
    if settings.window_pool:
        return _plan_two_pools(settings, wanted, free_bytes)
    size = block_bytes(settings)
    blocks = wanted // size
    if blocks < MIN_BLOCKS:
        raise PoolError(
            f"engine.kv_cache ({settings.kv_cache_text} = {wanted} bytes) holds {blocks} KV "
            f"blocks of {size} bytes ({settings.block_size} tokens of {settings.model}); at "
            f"least {MIN_BLOCKS} are needed: raise engine.kv_cache")
    return PoolPlan(blocks, size, free_bytes)


def _plan_two_pools(settings: EngineSettings, wanted: int, free_bytes: int) -> PoolPlan:
    full, window = block_bytes(settings, windowed=False), block_bytes(settings, windowed=True)
    target = window_blocks_wanted(settings)
    if wanted >= target * (window + full):
        windows = target
        blocks = (wanted - windows * window) // full
    else:  # as many of each: what one pool over every layer would hold
        blocks = windows = wanted // (full + window)
    least = -(-(settings.shape.sliding_window - 1) // settings.block_size) + 2
    if blocks < MIN_BLOCKS or windows < least:
        raise PoolError(
            f"engine.kv_cache ({settings.kv_cache_text} = {wanted} bytes) holds {blocks} KV "
            f"blocks of {full} bytes and {windows} sliding-window blocks of {window} bytes "
            f"({settings.block_size} tokens of {settings.model}); at least {MIN_BLOCKS} and "
            f"{least} are needed: raise engine.kv_cache")
    return PoolPlan(blocks, full, free_bytes, windows, window)


def _budget(settings: EngineSettings, free_bytes: int, device: str) -> int:
    """The bytes the pool may take: engine.kv_cache, checked against what is free."""
    if settings.kv_cache_bytes is not None:
        wanted = settings.kv_cache_bytes
        if wanted > free_bytes:
            raise PoolError(
                f"engine.kv_cache asks for {format_size(wanted)} but only "
                f"{format_size(free_bytes)} of {device} memory is free; lower engine.kv_cache "
                "or use a fraction such as 0.5")
    else:
        wanted = int(free_bytes * (settings.kv_cache_fraction or 0.0))
    return wanted


class KVPool:
    """The KV cache: per layer a key and a value array ``[blocks, block_size, kv_heads, dim]``
    (a windowed layer's from the window pool: ``windowed[layer]``)."""

    def __init__(self, settings: EngineSettings, plan: PoolPlan, backend: Any) -> None:
        g = settings.shape
        dtype = storage_dtype(settings.dtype)
        self.plan = plan
        self.dtype = dtype
        self.windowed = [settings.window_pool and g.is_windowed(i) for i in range(g.layers)]
        self.keys: list[Any] = []
        self.values: list[Any] = []
        try:
            for windowed in self.windowed:
                blocks = plan.window_blocks if windowed else plan.num_blocks
                shape = (blocks, settings.block_size, g.kv_heads, g.head_dim)
                self.keys.append(backend.empty(shape, dtype))
                self.values.append(backend.empty(shape, dtype))
        except Exception as exc:  # MemoryError, pycuda.driver.MemoryError, ...
            self.keys.clear()
            self.values.clear()
            raise PoolError(f"cannot allocate the KV pool ({format_size(plan.bytes)}, "
                            f"{plan.num_blocks} blocks): {exc}; lower engine.kv_cache") from None

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    @property
    def nbytes(self) -> int:
        return self.plan.bytes
