"""GGUF files read through velod.model.gguf: plain metadata, tensors, and a clear error for
every way a file can be wrong; the package stays light to import."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from velod.model.gguf import ModelFileError, open_gguf


def test_open_gives_plain_metadata_and_tensors_in_numpy_order(tiny_llama):
    f = open_gguf(tiny_llama)
    assert f.architecture == "llama"
    assert f.metadata["llama.embedding_length"] == 256
    assert isinstance(f.metadata["llama.rope.freq_base"], float)
    assert f.metadata["general.name"] == "tiny-llama"
    q = f.tensor("blk.0.attn_q.weight")
    assert q.shape == (256, 256) and q.ggml_type == "Q4_K"
    assert q.data.dtype == np.uint8 and q.data.size == q.nbytes == 256 * 256 // 256 * 144
    assert f.tensor("token_embd.weight").shape == (97, 256)
    f.release(q)  # drops the pages from this process; the data stays readable
    assert f.tensor("blk.0.attn_q.weight").data[:4].size == 4


def test_missing_tensor_is_named(tiny_llama):
    with pytest.raises(ModelFileError, match="no tensor 'nope'"):
        open_gguf(tiny_llama).tensor("nope")


def test_a_text_file_is_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 3)
    with pytest.raises(ModelFileError, match=r"not a GGUF file \(starts with b'thes'"):
        open_gguf(path)


def test_a_tiny_file_is_too_short(tmp_path):
    path = tmp_path / "short.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelFileError, match="too short"):
        open_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_file_is_a_clear_error(tiny_llama, tmp_path, keep):
    data = tiny_llama.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated"):
        open_gguf(path)


def test_a_file_cut_inside_its_header_is_a_clear_error(tiny_llama, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_llama.read_bytes()[:900])  # past the counts, inside tensor infos
    with pytest.raises(ModelFileError, match="truncated or corrupt: it needs bytes past"):
        open_gguf(path)


def test_an_unsupported_version_is_named(tiny_llama, tmp_path):
    data = bytearray(tiny_llama.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    path = tmp_path / "v7.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="version 7; supported versions are 2, 3"):
        open_gguf(path)


def test_impossible_counts_in_the_header_are_corruption(tiny_llama, tmp_path):
    data = bytearray(tiny_llama.read_bytes())
    data[8:16] = struct.pack("<Q", 2**40)  # tensor count
    path = tmp_path / "counts.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        open_gguf(path)


def test_a_garbage_array_length_fails_fast_instead_of_looping(tmp_path):
    # One metadata entry: an array of uint8 claiming 2^50 elements in a 64-byte file.
    key = b"x.y"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**50)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    path = tmp_path / "array.gguf"
    path.write_bytes(header + body + b"\0" * 8)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        open_gguf(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        open_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_gguf(tmp_path)


def test_the_model_package_is_light_to_import():
    # velod.model is a leaf: reading a name or a manifest must not pull in NumPy or gguf.
    import subprocess
    import sys

    code = ("import sys, velod.model.store, velod.model.gguf; "
            "print(sorted(m for m in ('numpy', 'gguf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
