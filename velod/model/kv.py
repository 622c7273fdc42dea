"""How many bytes a model's KV cache takes: the one formula the planner and the engine use.

Per layer, a cached token holds ``kv_heads × (key_length + value_length)`` elements of the
cache type. How many tokens (cells) a layer keeps depends on its kind, as llama.cpp
allocates them (``src/llama-kv-cache-iswa.cpp``; Ollama runs the same engine):

- a full-attention layer keeps the whole context of every slot: ``context × slots`` cells;
- a sliding-window layer keeps, per slot, only what its window can still see plus one
  micro-batch being added: ``min(context, pad(window + ubatch, 256))`` cells.

For Gemma 3 270M at 2048 tokens × 4 slots (llama-server ``-c 8192 -np 4``) that is 24 MiB for
its 3 full layers and 60 MiB for its 15 windowed ones (1024 cells per slot) — as llama-server
logs it — where sizing every layer at the full context would say 144 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from velod.model.metadata import Geometry

# Bytes per cached element. q8_0 and q4_0 are GGML block types: 32 values share one f16
# scale, so a q8_0 block is 32 + 2 bytes and q4_0 16 + 2. The engine's element types
# (float16, bfloat16, float32) are listed under their NumPy names too.
BYTES_PER_ELEMENT: dict[str, float] = {
    "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
    "bf16": 2.0, "f32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float32": 4.0,
}
# The cache types Ollama's OLLAMA_KV_CACHE_TYPE takes, most precise first.
OLLAMA_CACHE_TYPES = ("f16", "q8_0", "q4_0")
CELL_PADDING = 256  # llama.cpp pads cache sizes to this many cells
DEFAULT_UBATCH = 512  # llama.cpp's default micro-batch (-ub)


def bytes_per_element(cache_type: str) -> float:
    """Bytes of one cached value of ``cache_type`` (ValueError naming the known types)."""
    try:
        return BYTES_PER_ELEMENT[cache_type]
    except KeyError:
        known = ", ".join(OLLAMA_CACHE_TYPES)
        raise ValueError(f"unknown KV cache type {cache_type!r} (known: {known})") from None


def kv_bytes_per_token(geometry: Geometry, cache_type: str = "f16", *,
                       windowed: bool | None = None) -> float:
    """Bytes of K and V one cached token takes over all layers, or over the full-attention
    (``windowed=False``) or sliding-window (``windowed=True``) layers only."""
    layers = (geometry.layers if windowed is None
              else geometry.windowed_layers if windowed else geometry.full_layers)
    per_layer = geometry.kv_heads * (geometry.key_length + geometry.value_length)
    return layers * per_layer * bytes_per_element(cache_type)


def window_cells(geometry: Geometry, context: int, ubatch: int = DEFAULT_UBATCH) -> int:
    """Cells one slot of a sliding-window layer keeps: the window plus a micro-batch, padded,
    never more than the slot's context."""
    padded = -(-(geometry.sliding_window + ubatch) // CELL_PADDING) * CELL_PADDING
    return min(context, padded)


@dataclass(frozen=True)
class KvCacheSize:
    """Bytes of a KV cache, split by layer kind."""

    full: int
    windowed: int
    full_cells: int
    windowed_cells: int

    @property
    def total(self) -> int:
        return self.full + self.windowed


def kv_cache_size(geometry: Geometry, context: int, slots: int = 1, cache_type: str = "f16",
                  *, ubatch: int = DEFAULT_UBATCH) -> KvCacheSize:
    """The KV cache of ``slots`` sequences of ``context`` tokens each, per layer kind."""
    if context < 0 or slots < 0:
        raise ValueError("context and slots must not be negative")
    full_cells = context * slots
    swa_cells = window_cells(geometry, context, ubatch) * slots if geometry.windowed_layers else 0
    return KvCacheSize(
        full=math.ceil(kv_bytes_per_token(geometry, cache_type, windowed=False) * full_cells),
        windowed=math.ceil(kv_bytes_per_token(geometry, cache_type, windowed=True) * swa_cells),
        full_cells=full_cells, windowed_cells=swa_cells)


def kv_cache_bytes(geometry: Geometry, context: int, slots: int = 1, cache_type: str = "f16",
                   *, ubatch: int = DEFAULT_UBATCH) -> int:
    """Total bytes of :func:`kv_cache_size`."""
    return kv_cache_size(geometry, context, slots, cache_type, ubatch=ubatch).total
