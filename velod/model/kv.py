"""How many bytes a model's KV cache takes: the one formula the planner and the engine use.

Per layer, a cached token holds ``kv_heads × key_length`` elements of the K cache type and
``kv_heads × value_length`` of the V cache type. How many tokens (cells) a layer keeps
depends on its kind and on how the cache is laid out, as llama.cpp allocates it
(``src/llama-context.cpp``, ``src/llama-kv-cache-iswa.cpp``; Ollama runs the same engine).
Checked against the llama-server of ``../shared/wheels`` by
``tests/unit/model/test_kv_llama_server.py``, which reads the sizes it logs.

- Contexts are padded to 256 cells: a sequence's context ``c`` holds ``pad(c)`` cells.
- Per-sequence cache (llama-server ``-np N``, the default when slots are given): one stream
  per slot. A full-attention layer keeps ``pad(c)`` cells per slot; a sliding-window layer
  ``pad(min(pad(c), window + ubatch))`` per slot: what its window can still see plus one
  micro-batch being added.
- Unified cache (``--kv-unified``; llama-server's default when the slot count is left on
  auto): one pool of ``pad(c)`` cells shared by every slot, each of which may fill it. A
  windowed layer keeps ``pad(min(pad(c), window × slots + ubatch))`` cells.
- ``swa_full`` sizes windowed layers like full ones (llama-server ``--swa-full``).

For Gemma 3 270M at 2048 tokens × 4 slots (llama-server ``-c 8192 -np 4``) that is 24 MiB for
its 3 full layers and 60 MiB for its 15 windowed ones (1024 cells per slot), where sizing
every layer at the full context would say 144 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from velod.model.metadata import Geometry

# Bytes per cached element. The quantized ones are GGML block types of 32 values with f16
# scales: q8_0 is 32 + 2 bytes a block, q4_0 16 + 2, q4_1 16 + 2 + 2, q5_0 16 + 4 + 2,
# q5_1 16 + 4 + 2 + 2, iq4_nl 16 + 2. The engine's element types (float16, bfloat16,
# float32) are listed under their NumPy names too.
BYTES_PER_ELEMENT: dict[str, float] = {
    "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "bf16": 2.0, "f32": 4.0,
    "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
    "float16": 2.0, "bfloat16": 2.0, "float32": 4.0,
}
# The cache types Ollama's OLLAMA_KV_CACHE_TYPE takes, most precise first.
OLLAMA_CACHE_TYPES = ("f16", "q8_0", "q4_0")
# The cache types llama-server's --cache-type-k/-v take (its --help), as llama.cpp lists them.
LLAMA_CPP_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
CELL_PADDING = 256  # llama.cpp pads contexts and window caches to this many cells
DEFAULT_UBATCH = 512  # llama.cpp's default micro-batch (-ub)


def bytes_per_element(cache_type: str) -> float:
    """Bytes of one cached value of ``cache_type`` (ValueError naming the known types)."""
    try:
        return BYTES_PER_ELEMENT[cache_type]
    except KeyError:
        known = ", ".join(LLAMA_CPP_CACHE_TYPES)
        raise ValueError(f"unknown KV cache type {cache_type!r} (known: {known})") from None


def is_quantized(cache_type: str) -> bool:
    """True for a GGML block type (llama.cpp needs flash attention to quantize V)."""
    bytes_per_element(cache_type)  # unknown names raise
    return cache_type.startswith(("q", "iq"))


def pad_cells(cells: int) -> int:
    """``cells`` rounded up to llama.cpp's padding."""
    return -(-cells // CELL_PADDING) * CELL_PADDING


def kv_bytes_per_token(geometry: Geometry, cache_type: str = "f16", *,
                       windowed: bool | None = None, cache_type_v: str | None = None) -> float:
    """Bytes of K and V one cached token takes over all layers, or over the full-attention
    (``windowed=False``) or sliding-window (``windowed=True``) layers only. V uses
    ``cache_type_v`` when given, else ``cache_type`` too."""
    layers = (geometry.layers if windowed is None
              else geometry.windowed_layers if windowed else geometry.full_layers)
    k = geometry.key_length * bytes_per_element(cache_type)
    v = geometry.value_length * bytes_per_element(cache_type_v or cache_type)
    return layers * geometry.kv_heads * (k + v)


def window_cells(geometry: Geometry, context: int, ubatch: int = DEFAULT_UBATCH,
                 sequences: int = 1) -> int:
    """Cells a sliding-window layer keeps per stream: the window (of each of ``sequences``
    sharing the stream) plus a micro-batch, padded, never more than the padded context."""
    return pad_cells(min(pad_cells(context), geometry.sliding_window * sequences + ubatch))


def context_per_sequence(n_ctx: int, n_seq: int, unified: bool = False) -> int:
    """The context one sequence gets when llama.cpp is given ``n_ctx`` for ``n_seq``
    sequences (llama-server ``-c``, ``-np``): all of it when unified, else an equal share,
    each padded."""
    if n_ctx <= 0 or n_seq <= 0:
        raise ValueError("n_ctx and n_seq must be greater than 0")
    total = pad_cells(n_ctx)
    return total if unified else pad_cells(total // n_seq)


@dataclass(frozen=True)
class KvCacheSize:
    """Bytes of a KV cache, split by layer kind, with the cells of each (all streams)."""

    full: int
    windowed: int
    full_cells: int
    windowed_cells: int

    @property
    def total(self) -> int:
        return self.full + self.windowed


def kv_cache_size(geometry: Geometry, context: int, slots: int = 1, cache_type: str = "f16",
                  *, cache_type_v: str | None = None, ubatch: int = DEFAULT_UBATCH,
                  unified: bool = False, swa_full: bool = False) -> KvCacheSize:
    """The KV cache of ``slots`` sequences that may each reach ``context`` tokens.

    ``unified``: the slots share one pool of ``context`` cells (llama.cpp's unified cache)
    instead of holding ``context`` cells each.
    """
    if context < 0 or slots < 0:
        raise ValueError("context and slots must not be negative")
    if context == 0 or slots == 0:
        return KvCacheSize(0, 0, 0, 0)
    streams = 1 if unified else slots
    per_stream = pad_cells(context)
    full_cells = per_stream * streams
    swa_cells = 0
    if geometry.windowed_layers:
        swa_cells = streams * (per_stream if swa_full else window_cells(
            geometry, context, ubatch, slots if unified else 1))
    return KvCacheSize(
        full=math.ceil(kv_bytes_per_token(geometry, cache_type, windowed=False,
                                          cache_type_v=cache_type_v) * full_cells),
        windowed=math.ceil(kv_bytes_per_token(geometry, cache_type, windowed=True,
                                              cache_type_v=cache_type_v) * swa_cells),
        full_cells=full_cells, windowed_cells=swa_cells)


def kv_cache_bytes(geometry: Geometry, context: int, slots: int = 1, cache_type: str = "f16",
                   *, cache_type_v: str | None = None, ubatch: int = DEFAULT_UBATCH,
                   unified: bool = False) -> int:
    """Total bytes of :func:`kv_cache_size`."""
    return kv_cache_size(geometry, context, slots, cache_type, cache_type_v=cache_type_v,
                         ubatch=ubatch, unified=unified).total
