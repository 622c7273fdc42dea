"""Geometry from a model's metadata (GGUF header or /api/show's model_info)."""

from __future__ import annotations

import pytest

from velod.model import catalog
from velod.model.metadata import Geometry, GeometryError, UnknownArchitecture, swa_pattern

# The model_info of Ollama's /api/show documentation example (llama3 8B), keys as Ollama
# writes them, including ones the planner does not read.
LLAMA3_8B_SHOW = {
    "general.architecture": "llama",
    "general.file_type": 2,
    "general.parameter_count": 8030261248,
    "general.quantization_version": 2,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 8,
    "llama.attention.layer_norm_rms_epsilon": 0.00001,
    "llama.block_count": 32,
    "llama.context_length": 8192,
    "llama.embedding_length": 4096,
    "llama.feed_forward_length": 14336,
    "llama.rope.dimension_count": 128,
    "llama.rope.freq_base": 500000,
    "llama.vocab_size": 128256,
    "tokenizer.ggml.bos_token_id": 128000,
    "tokenizer.ggml.eos_token_id": 128009,
    "tokenizer.ggml.merges": [],
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "llama-bpe",
    "tokenizer.ggml.token_type": [],
    "tokenizer.ggml.tokens": [],
}

# gemma2 GGUFs carry explicit key/value lengths: head_dim 256, not 3584 / 16 = 224.
GEMMA2_9B_SHOW = {
    "general.architecture": "gemma2",
    "gemma2.attention.head_count": 16,
    "gemma2.attention.head_count_kv": 8,
    "gemma2.attention.key_length": 256,
    "gemma2.attention.value_length": 256,
    "gemma2.attention.sliding_window": 4096,
    "gemma2.block_count": 42,
    "gemma2.context_length": 8192,
    "gemma2.embedding_length": 3584,
}


def test_llama3_geometry_from_the_documented_show_response() -> None:
    g = Geometry.from_metadata(LLAMA3_8B_SHOW)
    assert (g.architecture, g.layers, g.heads, g.kv_heads) == ("llama", 32, 32, 8)
    assert (g.key_length, g.value_length) == (128, 128)  # 4096 / 32, no explicit lengths
    assert (g.context_length, g.vocab_size) == (8192, 128256)
    assert g.has_gqa


def test_explicit_key_and_value_lengths_win_over_embedding_per_head() -> None:
    g = Geometry.from_metadata(GEMMA2_9B_SHOW)
    assert (g.key_length, g.value_length) == (256, 256)


def test_missing_head_count_kv_means_no_gqa() -> None:
    info = {k: v for k, v in LLAMA3_8B_SHOW.items() if k != "llama.attention.head_count_kv"}
    g = Geometry.from_metadata(info)
    assert g.kv_heads == g.heads == 32
    assert not g.has_gqa


def test_per_layer_kv_head_list_takes_the_largest_layer() -> None:
    # Hybrid/OpenELM-style GGUFs give one count per layer (0 for layers without attention).
    info = dict(LLAMA3_8B_SHOW, **{"llama.attention.head_count_kv": [0, 8, 4] * 10 + [8, 8]})
    assert Geometry.from_metadata(info).kv_heads == 8


@pytest.mark.parametrize(("info", "message"), [
    ({}, "no general.architecture"),
    ({"general.architecture": ""}, "no general.architecture"),
    ({"general.architecture": "mamba", "mamba.block_count": 64, "mamba.embedding_length": 2560,
      "mamba.context_length": 1048576}, "no mamba.attention.head_count"),
    (dict(LLAMA3_8B_SHOW, **{"llama.block_count": "32"}), "not a non-negative integer"),
    (dict(LLAMA3_8B_SHOW, **{"llama.block_count": True}), "not a non-negative integer"),
    (dict(LLAMA3_8B_SHOW, **{"llama.block_count": 0}), "must be greater than 0"),
    (dict(LLAMA3_8B_SHOW, **{"llama.attention.head_count_kv": 64}), "between 1 and"),
    (dict(LLAMA3_8B_SHOW, **{"llama.attention.head_count_kv": ["x"]}), "list of integers"),
    (dict(LLAMA3_8B_SHOW, **{"llama.embedding_length": 16}), "key_length and value_length"),
])
def test_unusable_model_info_raises_unknown_architecture(info: dict, message: str) -> None:
    with pytest.raises(UnknownArchitecture, match=message) as caught:
        Geometry.from_metadata(info)
    assert "cannot size the KV cache" in str(caught.value)
    assert caught.value.reason


def test_every_catalog_entry_round_trips_through_show_keys() -> None:
    for entry in catalog.CATALOG.values():
        assert Geometry.from_metadata(entry.show_model_info()) == entry.geometry, entry.name


def test_gemma2_windows_every_other_layer_as_llama_cpp_does() -> None:
    g = Geometry.from_metadata(GEMMA2_9B_SHOW)
    assert g.sliding_window == 4096
    assert g.windowed[:4] == (True, False, True, False)  # set_swa_pattern(2): even layers
    assert (g.windowed_layers, g.full_layers) == (21, 21)


def test_gemma3_keeps_one_full_layer_in_six() -> None:
    info = {"general.architecture": "gemma3", "gemma3.block_count": 18,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.embedding_length": 640, "gemma3.context_length": 32768,
            "gemma3.attention.sliding_window": 512}
    g = Geometry.from_metadata(info)
    assert [il for il in range(18) if not g.is_windowed(il)] == [5, 11, 17]
    assert g.windowed_layers == 15


def test_a_stated_pattern_wins_over_the_architecture_default() -> None:
    period = dict(GEMMA2_9B_SHOW, **{"gemma2.attention.sliding_window_pattern": 3})
    assert Geometry.from_metadata(period).windowed == swa_pattern(42, 3)
    flags = dict(GEMMA2_9B_SHOW, **{"gemma2.attention.sliding_window_pattern": [True, True,
                                                                                   False]})
    assert Geometry.from_metadata(flags).windowed[:6] == (True, True, False) * 2


def test_a_window_of_an_unknown_pattern_counts_as_full_attention() -> None:
    info = dict(LLAMA3_8B_SHOW, **{"llama.attention.sliding_window": 4096})
    g = Geometry.from_metadata(info)
    assert g.windowed == () and g.sliding_window == 0 and g.full_layers == 32


def test_swa_pattern_follows_set_swa_pattern() -> None:
    assert swa_pattern(4, 0) == (True,) * 4  # period 0: every layer windowed
    assert swa_pattern(4, 1) == (False,) * 4  # period 1: none
    assert swa_pattern(6, 3) == (True, True, False) * 2


def test_geometry_refuses_heads_that_kv_heads_do_not_divide() -> None:
    with pytest.raises(GeometryError, match="kv_heads: 3 must divide heads"):
        Geometry.attention_only(layers=2, heads=8, kv_heads=3, head_dim=64, context_length=512)


def test_head_dim_needs_equal_key_and_value_sizes() -> None:
    g = Geometry.from_metadata(dict(LLAMA3_8B_SHOW, **{"llama.attention.value_length": 64}))
    with pytest.raises(GeometryError, match="key and value head sizes differ"):
        _ = g.head_dim
