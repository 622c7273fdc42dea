"""velod's KV-cache size against what the real llama-server allocates and logs.

Each case starts llama.cpp's server from ``../shared/wheels`` (``-lv 4`` makes it log every
cache it creates: ``llama_kv_cache: size = 24.00 MiB (...)``), adds up the sizes it logs, and
compares velod's estimate for the same settings: within 5%, as issue 17 asks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import assets
from velod.model.gguf_header import read_geometry
from velod.model.kv import context_per_sequence, kv_cache_size

pytestmark = pytest.mark.real_model

MIB = 1024**2
SIZE_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB")
UNIFIED_LINE = re.compile(r"kv_unified\s*=\s*(true|false)")


def logged_kv_bytes(model: Path, ctx: int, *args: str) -> tuple[int, bool]:
    """(bytes of every KV cache llama-server logs, whether it made one unified pool)."""
    with assets.llama_server(model, "-lv", "4", "--no-warmup", *args, ctx=ctx) as server:
        log = server.log.read_text(errors="replace")
    sizes = [float(m) for m in SIZE_LINE.findall(log)]
    unified = UNIFIED_LINE.search(log)
    assert sizes and unified, f"llama-server logged no KV cache sizes:\n{log[-3000:]}"
    return round(sum(sizes) * MIB), unified.group(1) == "true"


def velod_estimate(model: Path, ctx: int, slots: int, unified: bool, k: str = "f16",
                   v: str = "f16", ubatch: int = 512) -> int:
    geometry = read_geometry(model)
    per_sequence = context_per_sequence(ctx, slots, unified)
    return kv_cache_size(geometry, per_sequence, slots, k, cache_type_v=v, ubatch=ubatch,
                         unified=unified).total


GEMMA_CASES = [
    # (-c, slots, K type, V type, extra flags, unified expected)
    (8192, 4, "f16", "f16", (), False),  # the example: 24 + 60 MiB
    (4096, 1, "q8_0", "q8_0", (), False),  # quantized cache, flash attention on auto
    (20000, 3, "q4_0", "q4_0", ("-fa", "on"), False),  # contexts padded to 256 cells
    (6000, 3, "f16", "f16", ("--kv-unified",), True),  # one pool: window x slots + ubatch
    (32768, 8, "f16", "f16", ("-ub", "256"), False),  # a smaller micro-batch
]
TINY_CASES = [
    (3000, 3, "f16", "f16", (), False),
    (4096, 1, "q8_0", "q8_0", (), False),
    (1000, 2, "q4_0", "f16", ("-fa", "off"), False),  # quantized K alone needs no FA
]


def _check(model: Path, ctx: int, slots: int, k: str, v: str, extra: tuple[str, ...],
           unified: bool) -> None:
    logged, was_unified = logged_kv_bytes(model, ctx, "-np", str(slots), "-ctk", k,
                                          "-ctv", v, *extra)
    assert was_unified == unified
    ubatch = int(extra[extra.index("-ub") + 1]) if "-ub" in extra else 512
    estimate = velod_estimate(model, ctx, slots, unified, k, v, ubatch)
    assert abs(estimate - logged) <= 0.05 * logged, (estimate, logged)


@pytest.mark.parametrize(("ctx", "slots", "k", "v", "extra", "unified"), GEMMA_CASES)
def test_gemma3_estimate_is_within_5_percent_of_what_llama_server_allocates(
        gemma_gguf: Path, ctx: int, slots: int, k: str, v: str, extra: tuple[str, ...],
        unified: bool) -> None:
    _check(gemma_gguf, ctx, slots, k, v, extra, unified)


@pytest.mark.parametrize(("ctx", "slots", "k", "v", "extra", "unified"), TINY_CASES)
def test_full_attention_estimate_is_within_5_percent_of_what_llama_server_allocates(
        tiny_llm_gguf: Path, ctx: int, slots: int, k: str, v: str, extra: tuple[str, ...],
        unified: bool) -> None:
    _check(tiny_llm_gguf, ctx, slots, k, v, extra, unified)


def test_automatic_slots_share_one_unified_pool(gemma_gguf: Path) -> None:
    # Without -np llama-server makes 4 slots sharing the whole context (kv_unified).
    logged, unified = logged_kv_bytes(gemma_gguf, 8192)
    assert unified
    assert logged == velod_estimate(gemma_gguf, 8192, 4, unified=True)
