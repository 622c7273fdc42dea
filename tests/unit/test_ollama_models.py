"""Geometry from /api/show's model_info, KV bytes per token, and the small state types."""

from __future__ import annotations

import pytest

from velod import catalog
from velod.ollama.models import (
    Geometry,
    LoadedModel,
    ModelInfo,
    OllamaState,
    UnknownArchitecture,
)

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
    g = Geometry.from_model_info(LLAMA3_8B_SHOW)
    assert (g.architecture, g.layers, g.heads, g.kv_heads) == ("llama", 32, 32, 8)
    assert (g.key_length, g.value_length) == (128, 128)  # 4096 / 32, no explicit lengths
    assert (g.context_length, g.vocab_size) == (8192, 128256)
    assert g.has_gqa


def test_kv_bytes_per_token_by_cache_type() -> None:
    g = Geometry.from_model_info(LLAMA3_8B_SHOW)
    assert g.kv_bytes_per_token("f16") == 32 * 8 * (128 + 128) * 2 == 131072
    assert g.kv_bytes_per_token("q8_0") == 32 * 8 * (128 + 128) * 34 / 32 == 69632
    assert g.kv_bytes_per_token("q4_0") == 32 * 8 * (128 + 128) * 18 / 32 == 36864
    with pytest.raises(ValueError, match="unknown KV cache type 'q5_1'"):
        g.kv_bytes_per_token("q5_1")


def test_explicit_key_and_value_lengths_win_over_embedding_per_head() -> None:
    g = Geometry.from_model_info(GEMMA2_9B_SHOW)
    assert (g.key_length, g.value_length) == (256, 256)
    assert g.kv_bytes_per_token("f16") == 42 * 8 * (256 + 256) * 2 == 344064


def test_missing_head_count_kv_means_no_gqa() -> None:
    info = {k: v for k, v in LLAMA3_8B_SHOW.items() if k != "llama.attention.head_count_kv"}
    g = Geometry.from_model_info(info)
    assert g.kv_heads == g.heads == 32
    assert not g.has_gqa
    assert g.kv_bytes_per_token("f16") == 32 * 32 * 256 * 2 == 524288


def test_per_layer_kv_head_list_takes_the_largest_layer() -> None:
    # Hybrid/OpenELM-style GGUFs give one count per layer (0 for layers without attention).
    info = dict(LLAMA3_8B_SHOW, **{"llama.attention.head_count_kv": [0, 8, 4] * 10 + [8, 8]})
    assert Geometry.from_model_info(info).kv_heads == 8


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
        Geometry.from_model_info(info)
    assert "cannot size the KV cache" in str(caught.value)
    assert caught.value.reason


def test_every_catalog_entry_round_trips_through_show_keys() -> None:
    for entry in catalog.CATALOG.values():
        assert Geometry.from_model_info(entry.show_model_info()) == entry.geometry, entry.name


def test_loaded_model_spills_when_part_is_outside_vram() -> None:
    spilled = LoadedModel("llama3.1:70b", size=45 * 2**30, size_vram=20 * 2**30,
                          context_length=4096)
    assert spilled.spills_to_cpu
    assert spilled.gpu_fraction == pytest.approx(20 / 45)
    assert not LoadedModel("qwen2.5:7b", 5 * 2**30, 5 * 2**30, 4096).spills_to_cpu


def test_state_finds_models_with_or_without_latest_tag() -> None:
    model = ModelInfo("llama3:latest", "sha256:abc", 4_700_000_000, None, "unknown")
    state = OllamaState(version="0.32.1", models=[model], loaded=[], reachable=True)
    assert state.model("llama3") is model
    assert state.model("llama3:latest") is model
    assert state.model("llama3:8b") is None
