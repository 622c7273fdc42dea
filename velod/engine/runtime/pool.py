"""The KV pool: how many blocks fit, and the per-layer key and value arrays that hold them.

A block holds ``block_size`` tokens of every layer's K and V; its bytes come from the one KV
formula (:func:`velod.model.kv.kv_bytes_per_token`).
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
    """How big the pool is: blocks of ``block_size`` tokens over every layer, K and V."""

    num_blocks: int
    block_bytes: int
    free_bytes: int

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes


def block_bytes(settings: EngineSettings) -> int:
    """Bytes of one KV block: ``block_size`` tokens of every layer's K and V."""
    storage_dtype(settings.dtype)  # a clear error for an unknown type
    return int(settings.block_size * kv_bytes_per_token(settings.geometry, settings.dtype))


def plan_pool(settings: EngineSettings, free_bytes: int, device: str) -> PoolPlan:
    """Size the pool on a device with ``free_bytes`` free, or raise PoolError."""
    size = block_bytes(settings)
    if settings.kv_cache_bytes is not None:
        wanted = settings.kv_cache_bytes
        if wanted > free_bytes:
            raise PoolError(
                f"engine.kv_cache asks for {format_size(wanted)} but only "
                f"{format_size(free_bytes)} of {device} memory is free; lower engine.kv_cache "
                "or use a fraction such as 0.5")
    else:
        wanted = int(free_bytes * (settings.kv_cache_fraction or 0.0))
    blocks = wanted // size
    if blocks < MIN_BLOCKS:
        raise PoolError(
            f"engine.kv_cache ({settings.kv_cache_text} = {wanted} bytes) holds {blocks} KV "
            f"blocks of {size} bytes ({settings.block_size} tokens of {settings.model}); at "
            f"least {MIN_BLOCKS} are needed: raise engine.kv_cache")
    return PoolPlan(blocks, size, free_bytes)


class KVPool:
    """The KV cache: per layer a key and a value array ``[blocks, block_size, kv_heads, dim]``."""

    def __init__(self, settings: EngineSettings, plan: PoolPlan, backend: Any) -> None:
        g = settings.geometry
        shape = (plan.num_blocks, settings.block_size, g.kv_heads, g.head_dim)
        dtype = storage_dtype(settings.dtype)
        self.plan = plan
        self.dtype = dtype
        self.keys: list[Any] = []
        self.values: list[Any] = []
        try:
            for _ in range(g.layers):
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
