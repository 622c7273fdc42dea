"""Suite-wide fixtures: the real assets (llama.cpp's binaries, Gemma 3 270M) from tests/assets.py.

A missing asset makes the tests that ask for it fail with AssetError's message; they are
never skipped, so CI cannot pass without really running them.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests import assets


def pytest_configure(config: pytest.Config) -> None:
    """Let the programs the tests start see Ctrl-C even when the suite itself ignores it.

    A shell starts a background job (``make test &``, ``nohup``, some CI runners) with SIGINT
    ignored, and an ignored signal stays ignored across exec: velodctl and velod would then
    never see the SIGINT the Ctrl-C tests send them. Python's own handler, installed here,
    is reset to the default in every child at exec.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def llama_bin() -> Path:
    """The folder of llama.cpp's binaries, installed once into the asset cache."""
    return assets.llama_cpp_bin_dir()


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (fetched and checked on first use)."""
    return assets.gemma3_gguf()


@pytest.fixture(scope="session")
def gemma_metadata(gemma_gguf: Path) -> dict[str, Any]:
    """Every metadata key of the Gemma GGUF as plain Python values (read once: ~8 s)."""
    return assets.gguf_metadata(gemma_gguf)


@pytest.fixture(scope="session")
def gemma_tokenize(llama_bin: Path, gemma_gguf: Path) -> assets.LlamaTokenize:
    """llama.cpp's llama-tokenize on the Gemma GGUF."""
    return assets.LlamaTokenize(llama_bin, gemma_gguf)


@pytest.fixture(scope="session")
def tiny_llm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama GGUF with a real (trained, 600-token) SentencePiece-style
    tokenizer: a language model velod can load, tokenize for and serve in seconds."""
    from tests.tiny_vocab import spm_metadata
    from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny

    path = tmp_path_factory.mktemp("tiny-llm") / "tiny-llama.gguf"
    return write_tiny(path, SPECS["llama"], seed=7, vocab=spm_metadata())
