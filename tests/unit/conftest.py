"""Fixtures the unit tests of several packages share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF (no tokenizer), written once per module."""
    from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny

    return write_tiny(tmp_path_factory.mktemp("gguf") / "llama.gguf", SPECS["llama"])
