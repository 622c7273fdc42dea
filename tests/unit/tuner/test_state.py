"""The tuner's plain data about a server: installed and loaded models, state."""

from __future__ import annotations

import pytest

from velod.model import catalog
from velod.tuner.state import LoadedModel, ModelInfo, OllamaState, catalog_model


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


def test_a_catalog_entry_becomes_an_installed_model_with_its_geometry() -> None:
    info = catalog_model(catalog.CATALOG["qwen2.5:7b"])
    assert info.name == "qwen2.5:7b" and info.digest is None
    assert info.geometry == catalog.CATALOG["qwen2.5:7b"].geometry
