"""Fixtures of the model tests: the tiny GGUFs of each architecture with their dense reference."""

from __future__ import annotations

import pytest

from tests.unit.engine.models.dense_reference import DenseModel
from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (path, dense reference) of each tiny model, written once per module."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for arch, spec in SPECS.items():
        path = write_tiny(root / f"{arch}.gguf", spec, seed=len(arch))
        models[arch] = (path, DenseModel(path))
    return models
