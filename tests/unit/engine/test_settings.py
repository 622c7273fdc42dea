"""Engine settings: derived once from the config, presets over the catalog, explicit shapes."""

from __future__ import annotations

import pytest

from velod.config import parse_config
from velod.engine.core.errors import EngineConfigError
from velod.engine.runtime.pool import block_bytes
from velod.engine.settings import EngineSettings, preset_geometry
from velod.model import catalog
from velod.model.kv import kv_bytes_per_token


def settings_for(**engine) -> EngineSettings:
    return EngineSettings.from_config(parse_config({"engine": engine}).engine)


def test_llama3_8b_preset_is_the_real_attention_shape():
    g, source = preset_geometry("llama3.1-8b")
    assert (g.layers, g.heads, g.kv_heads, g.head_dim) == (32, 32, 8, 128)
    assert g.group_size == 4
    assert "meta-llama/Llama-3.1-8B" in source


@pytest.mark.parametrize("name", sorted(catalog.ENGINE_PRESETS))
def test_every_preset_is_its_catalog_entry(name):
    g, source = preset_geometry(name)
    entry = catalog.CATALOG[catalog.ENGINE_PRESETS[name]]
    assert g is entry.geometry and source == entry.source


def test_brief_presets_exist_with_known_shapes():
    assert preset_geometry("gemma2-9b")[0].head_dim == 256  # not hidden / heads = 224
    assert preset_geometry("qwen2.5-7b")[0].kv_heads == 4
    assert preset_geometry("mistral-7b")[0].context_length == 32768
    assert preset_geometry("llama3.1-70b")[0].layers == 80


def test_unknown_preset_names_the_key_and_suggests_a_close_name():
    with pytest.raises(EngineConfigError, match=r"did you mean 'llama3.1-8b'") as info:
        preset_geometry("llama3.1-8")
    assert info.value.field == "model"


def test_custom_geometry_comes_from_the_config():
    s = settings_for(model="custom", dtype="float32", block_size=16, geometry={
        "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64, "max_context": 512})
    g = s.geometry
    assert (s.model, g.layers, g.heads, g.kv_heads, g.head_dim, g.context_length) == (
        "custom", 2, 4, 2, 64, 512)
    # One KV formula: the engine's block is block_size tokens of it.
    assert kv_bytes_per_token(g, "float32") == 2 * 2 * 2 * 64 * 4
    assert block_bytes(s) == 16 * kv_bytes_per_token(g, "float32")


def test_default_config_resolves_to_a_preset():
    config = parse_config({})
    s = EngineSettings.from_config(config.engine)
    assert s.model == config.engine.model
    assert s.geometry is catalog.engine_preset(s.model).geometry


def test_settings_give_the_scheduler_its_limits_once():
    s = settings_for(max_batch_size=8, max_tokens_per_step=64, max_waiting=10)
    limits = s.scheduler_config(num_blocks=100, vocab_size=32000)
    assert (limits.num_blocks, limits.block_size, limits.max_batch_size,
            limits.max_tokens_per_step, limits.max_waiting, limits.vocab_size) == (
        100, s.block_size, 8, 64, 10, 32000)
    assert limits.max_model_len == s.geometry.context_length


@pytest.mark.parametrize(("changes", "key"), [
    ({"heads": 6, "kv_heads": 4}, "engine.geometry.kv_heads"),
    ({"max_context": 1}, "engine.geometry.max_context"),
])
def test_bad_explicit_numbers_are_refused_naming_the_config_key(changes, key):
    geometry = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64,
                "max_context": 512} | changes
    with pytest.raises(Exception) as info:
        parse_config({"engine": {"model": "custom", "geometry": geometry}})
    assert [i.path for i in info.value.issues] == [key]
