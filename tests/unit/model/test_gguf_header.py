"""The fast GGUF header reader: real files, long arrays stepped over, broken files named."""

from __future__ import annotations

from pathlib import Path

import pytest

from velod.model.gguf_header import GgufHeaderError, SkippedArray, read_geometry, read_metadata


def test_reads_the_tiny_models_shape_and_vocabulary_size(tiny_llm_gguf: Path) -> None:
    g = read_geometry(tiny_llm_gguf)
    assert (g.architecture, g.layers, g.heads, g.kv_heads, g.key_length) == ("llama", 2, 4, 2, 64)
    assert g.vocab_size == 864 and not g.windowed


def test_long_arrays_are_stepped_over_with_their_length(tiny_llm_gguf: Path) -> None:
    meta = read_metadata(tiny_llm_gguf, max_array=100)
    assert meta["tokenizer.ggml.tokens"] == SkippedArray(864)
    assert meta["llama.block_count"] == 2
    full = read_metadata(tiny_llm_gguf)
    assert full["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]


@pytest.mark.real_model
def test_gemma3_windows_come_from_the_architecture(gemma_gguf: Path,
                                                   gemma_metadata: dict) -> None:
    g = read_geometry(gemma_gguf)
    assert (g.layers, g.sliding_window, g.windowed_layers, g.vocab_size) == (18, 512, 15, 262144)
    fast = read_metadata(gemma_gguf)
    assert {k: v for k, v in fast.items() if not isinstance(v, SkippedArray)} == {
        k: v for k, v in gemma_metadata.items() if k in fast
        and not isinstance(fast[k], SkippedArray)}


@pytest.mark.parametrize(("data", "why"), [
    (b"", "ends inside its header"),
    (b"GGML" + bytes(20), "does not start with 'GGUF'"),
    (b"GGUF" + (7).to_bytes(4, "little") + bytes(16), "version 7 is not supported"),
    (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little")
     + (5).to_bytes(8, "little") + b"ab", "ends inside its header"),
])
def test_a_broken_file_is_named_with_what_is_wrong(tmp_path: Path, data: bytes,
                                                   why: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(GgufHeaderError, match=why) as info:
        read_metadata(path)
    assert str(path) in str(info.value)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(GgufHeaderError, match=r"cannot read .*No such file"):
        read_metadata(tmp_path / "absent.gguf")
