"""The one KV-cache size function: per layer kind, as llama.cpp allocates it."""

from __future__ import annotations

import pytest

from tests.unit.model.test_metadata import LLAMA3_8B_SHOW
from velod.model.catalog import CATALOG
from velod.model.kv import (
    bytes_per_element,
    context_per_sequence,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_cache_size,
    window_cells,
)
from velod.model.metadata import Geometry, swa_pattern

MIB = 1024**2
# Gemma 3 270M as its GGUF states it: 18 layers, 4 heads, 1 KV head of 256, window 512.
GEMMA3_270M = Geometry(architecture="gemma3", layers=18, heads=4, kv_heads=1, key_length=256,
                       value_length=256, embedding_length=640, context_length=32768,
                       vocab_size=262144, sliding_window=512, windowed=swa_pattern(18, 6))


def test_kv_bytes_per_token_by_cache_type() -> None:
    g = Geometry.from_metadata(LLAMA3_8B_SHOW)
    assert kv_bytes_per_token(g, "f16") == 32 * 8 * (128 + 128) * 2 == 131072
    assert kv_bytes_per_token(g, "q8_0") == 32 * 8 * (128 + 128) * 34 / 32 == 69632
    assert kv_bytes_per_token(g, "q4_0") == 32 * 8 * (128 + 128) * 18 / 32 == 36864
    assert kv_bytes_per_token(g, "float32") == 2 * kv_bytes_per_token(g, "float16")
    assert kv_bytes_per_token(g, "q8_0", cache_type_v="f16") == 32 * 8 * 128 * (34 / 32 + 2)
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        kv_bytes_per_token(g, "q3_k")


def test_full_attention_models_hold_context_times_slots_cells() -> None:
    g = Geometry.from_metadata(LLAMA3_8B_SHOW)
    size = kv_cache_size(g, 8192, 4, "f16")
    assert size.windowed == 0 and size.full_cells == 8192 * 4
    assert size.total == 131072 * 8192 * 4


def test_gemma3_270m_matches_what_llama_server_allocates() -> None:
    # llama-server -c 8192 -np 4 (2048 per slot): 24 MiB for the 3 full layers and 60 MiB
    # for the 15 windowed ones, 1024 cells per slot (window 512 + ubatch 512).
    size = kv_cache_size(GEMMA3_270M, 2048, 4, "f16")
    assert size.full == 24 * MIB
    assert size.windowed == 60 * MIB
    assert size.windowed_cells == 4 * 1024


def test_a_window_never_holds_more_than_the_padded_context() -> None:
    assert window_cells(GEMMA3_270M, 300) == 512  # 300 tokens take 512 cells (padding)
    assert window_cells(GEMMA3_270M, 32768) == 1024
    assert window_cells(GEMMA3_270M, 32768, ubatch=100) == 768  # 612 padded to 256s


def test_windowed_layers_grow_with_slots_not_with_context() -> None:
    small = kv_cache_size(GEMMA3_270M, 8192, 1)
    large = kv_cache_size(GEMMA3_270M, 32768, 1)
    assert large.windowed == small.windowed
    assert large.full == 4 * small.full
    # Sizing every layer at the full context would be 5x too large at 32k.
    naive = kv_bytes_per_token(GEMMA3_270M) * 32768
    assert naive / large.total > 4.5


def test_catalog_gemma2_is_sized_per_layer_kind() -> None:
    g = CATALOG["gemma2:9b"].geometry
    total = kv_cache_bytes(g, 8192, 1)
    per_layer = 8 * 512 * 2
    assert total == 21 * per_layer * 8192 + 21 * per_layer * min(8192, 4096 + 512)


def test_bytes_per_element_names_the_known_types() -> None:
    assert bytes_per_element("q8_0") == 34 / 32
    assert bytes_per_element("q5_1") == 24 / 32
    with pytest.raises(ValueError, match="known: f32, f16, bf16, q8_0, q4_0"):
        bytes_per_element("iq2")


def test_contexts_are_padded_to_256_cells_per_sequence() -> None:
    g = Geometry.from_metadata(LLAMA3_8B_SHOW)
    assert kv_cache_size(g, 1000, 2).full_cells == 2 * 1024
    # llama-server -c 20000 -np 3: 20224 cells padded, 6741 a slot, padded to 6912.
    assert context_per_sequence(20000, 3) == 6912
    assert context_per_sequence(6000, 3, unified=True) == 6144


def test_a_unified_pool_holds_one_window_per_slot_plus_a_micro_batch() -> None:
    # llama-server -c 8192 with automatic slots: 4 slots share 8192 cells; the windowed
    # layers keep 512 x 4 + 512 = 2560 of them.
    size = kv_cache_size(GEMMA3_270M, 8192, 4, unified=True)
    assert size.full_cells == 8192 and size.windowed_cells == 2560
    assert size.full == 24 * MIB and size.windowed == 2560 * 15 * 1024
    full = kv_cache_size(GEMMA3_270M, 8192, 4, unified=True, swa_full=True)
    assert full.windowed_cells == 8192
