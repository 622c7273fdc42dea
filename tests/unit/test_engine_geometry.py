"""Engine geometry: presets over the model catalog, explicit numbers, Ollama's /api/show."""

from __future__ import annotations

import pytest

from velod import catalog
from velod.config import parse_config
from velod.engine.geometry import (
    PRESETS,
    GeometryError,
    ModelGeometry,
    from_engine_config,
    from_ollama_show,
    preset,
)


def test_llama3_8b_preset_is_the_real_attention_shape():
    g = preset("llama3.1-8b")
    assert (g.layers, g.heads, g.kv_heads, g.head_dim) == (32, 32, 8, 128)
    assert g.group_size == 4
    assert "meta-llama/Llama-3.1-8B" in g.source


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_comes_from_its_catalog_entry(name):
    g = preset(name)
    entry = catalog.CATALOG[PRESETS[name]]
    assert (g.layers, g.heads, g.kv_heads) == (entry.geometry.layers, entry.geometry.heads,
                                                entry.geometry.kv_heads)
    assert g.head_dim == entry.geometry.key_length and g.source == entry.source
    # The engine's KV bytes per token agree with the planner's formula (f16 = 2 bytes).
    assert g.kv_bytes_per_token(2) == entry.geometry.kv_bytes_per_token("f16")


def test_brief_presets_exist_with_known_shapes():
    assert preset("gemma2-9b").head_dim == 256  # not hidden / heads = 224
    assert preset("qwen2.5-7b").kv_heads == 4
    assert preset("mistral-7b").max_context == 32768
    assert preset("llama3.1-70b").layers == 80


def test_unknown_preset_names_the_key_and_suggests_a_close_name():
    with pytest.raises(GeometryError, match=r"engine\.model.*did you mean 'llama3.1-8b'"):
        preset("llama3.1-8")


def test_custom_geometry_comes_from_the_config():
    config = parse_config({"engine": {"model": "custom", "geometry": {
        "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64, "max_context": 512}}})
    g = from_engine_config(config.engine)
    assert (g.name, g.layers, g.heads, g.kv_heads, g.head_dim, g.max_context) == (
        "custom", 2, 4, 2, 64, 512)
    assert g.kv_bytes_per_token(4) == 2 * 2 * 2 * 64 * 4
    assert g.block_bytes(16, 4) == 16 * g.kv_bytes_per_token(4)


def test_default_config_resolves_to_a_preset():
    assert from_engine_config(parse_config({}).engine).name == parse_config({}).engine.model


@pytest.mark.parametrize(("changes", "field"), [
    ({"heads": 6, "kv_heads": 4}, "kv_heads"),
    ({"layers": 0}, "layers"),
    ({"head_dim": True}, "head_dim"),
    ({"max_context": 1}, "max_context"),
])
def test_bad_explicit_numbers_are_refused_naming_the_field(changes, field):
    values = {"name": "x", "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64,
              "max_context": 512} | changes
    with pytest.raises(GeometryError) as info:
        ModelGeometry(**values)
    assert info.value.field == field


def test_geometry_from_ollama_show_matches_the_catalog():
    entry = catalog.CATALOG["qwen2.5:7b"]
    g = from_ollama_show(entry.show_model_info(), name="qwen2.5:7b")
    assert (g.layers, g.heads, g.kv_heads, g.head_dim, g.max_context) == (28, 28, 4, 128, 32768)
    assert g.name == "qwen2.5:7b"


def test_geometry_from_ollama_show_refuses_incomplete_or_uneven_heads():
    info = catalog.CATALOG["llama3.1:8b"].show_model_info()
    del info["llama.block_count"]
    with pytest.raises(GeometryError, match="block_count"):
        from_ollama_show(info)
    uneven = catalog.CATALOG["llama3.1:8b"].show_model_info() | {
        "llama.attention.value_length": 64}
    with pytest.raises(GeometryError, match="value_length"):
        from_ollama_show(uneven)
