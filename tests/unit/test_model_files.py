"""GGUF files read through velod.model.gguf, models found through Ollama's store, and the
clear errors for every way a model file can be wrong."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.unit.tiny_gguf import SPECS, TinySpec, write_tiny
from velod.engine.models import (
    ModelFileError,
    NotEnoughMemory,
    UnsupportedModel,
    UnsupportedQuantization,
    load_model,
)
from velod.model.gguf import open_gguf
from velod.model.store import (
    ManifestError,
    ModelNotFoundError,
    models_dirs,
    parse_name,
    resolve,
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("gguf") / "llama.gguf", SPECS["llama"])


# ------------------------------------------------------------------ reading GGUF


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


# ------------------------------------------------------------------ Ollama's store


def make_store(root: Path, name: str, tag: str, blob: bytes | None, *,
               host: str = "registry.ollama.ai", namespace: str = "library",
               manifest: str | None = None) -> Path:
    """An Ollama models directory holding one model, as ``ollama pull`` leaves it."""
    digest = "a" * 64
    layers = [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "b" * 64,
               "size": 10},
              {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
               "size": len(blob or b"")}]
    path = root / "manifests" / host / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest if manifest is not None else json.dumps(
        {"schemaVersion": 2, "config": {}, "layers": layers}))
    (root / "blobs").mkdir(exist_ok=True)
    if blob is not None:
        (root / "blobs" / f"sha256-{digest}").write_bytes(blob)
    return root / "blobs" / f"sha256-{digest}"


def test_names_get_ollamas_defaults():
    assert str(parse_name("gemma3:270m")) == "registry.ollama.ai/library/gemma3:270m"
    assert str(parse_name("qwen2.5")) == "registry.ollama.ai/library/qwen2.5:latest"
    assert str(parse_name("library/x:tag")) == "registry.ollama.ai/library/x:tag"
    assert str(parse_name("host.io/ns/x:tag")) == "host.io/ns/x:tag"
    for bad in ("a/b/c/d", "x:", "x y", "", "x:t:u"):
        with pytest.raises(ValueError, match="not an Ollama model name"):
            parse_name(bad)


@pytest.mark.parametrize("name, host, namespace, model, tag", [
    ("gemma3:270m", "registry.ollama.ai", "library", "gemma3", "270m"),
    ("qwen2.5", "registry.ollama.ai", "library", "qwen2.5", "latest"),
    ("someone/tiny:q4", "registry.ollama.ai", "someone", "tiny", "q4"),
    ("example.com/ns/x:1", "example.com", "ns", "x", "1"),
])
def test_an_ollama_name_resolves_to_its_model_blob(tmp_path, name, host, namespace, model, tag):
    blob = make_store(tmp_path, model, tag, b"GGUF...", host=host, namespace=namespace)
    found = resolve(name, [tmp_path / "elsewhere", tmp_path])
    assert found.path == blob
    assert found.digest == "sha256:" + "a" * 64
    assert found.manifest == tmp_path / "manifests" / host / namespace / model / tag


def test_a_capitalised_name_finds_a_lowercase_store(tmp_path):
    blob = make_store(tmp_path, "gemma3", "270m", b"GGUF")
    assert resolve("Gemma3:270M", [tmp_path]).path == blob


def test_models_dirs_put_ollama_models_first(tmp_path):
    dirs = models_dirs({"OLLAMA_MODELS": str(tmp_path)}, home=tmp_path / "home")
    assert dirs == [tmp_path, Path("/usr/share/ollama/.ollama/models"),
                    tmp_path / "home" / ".ollama" / "models"]


def test_a_missing_model_says_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no such model.*looked for .*"
                       r"manifests/registry.ollama.ai/library/llama3.2/1b.*ollama pull"):
        resolve("llama3.2:1b", [tmp_path])


def test_a_missing_blob_is_named(tmp_path):
    make_store(tmp_path, "gemma3", "270m", None)
    with pytest.raises(ModelNotFoundError, match="which is missing"):
        resolve("gemma3:270m", [tmp_path])


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"layers": "x"}), "no \"layers\" list"),
    (json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.license"}]}),
     "no layer of mediaType application/vnd.ollama.image.model"),
    (json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                             "digest": "md5:abc"}]}), "not sha256"),
])
def test_malformed_manifests_are_clear_errors(tmp_path, manifest, message):
    make_store(tmp_path, "gemma3", "270m", b"", manifest=manifest)
    with pytest.raises(ManifestError, match=message):
        resolve("gemma3:270m", [tmp_path])


def test_a_path_is_taken_as_a_file(tiny_llama, tmp_path):
    assert resolve(str(tiny_llama)).path == tiny_llama
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        resolve(str(tmp_path / "absent.gguf"))


def test_a_model_loads_through_the_store(tiny_llama, tmp_path, monkeypatch):
    blob = make_store(tmp_path, "tiny", "latest", tiny_llama.read_bytes())
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    model = load_model("tiny")
    assert model.info["path"] == str(blob)
    assert model.describe()["architecture"] == "llama"


# ------------------------------------------------------------------ loading errors


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    spec = TinySpec("mamba", layers=1)
    path = write_tiny(tmp_path / "mamba.gguf", spec)
    with pytest.raises(UnsupportedModel, match="'mamba' is not supported; supported: llama, "
                       "qwen2, gemma3"):
        load_model(str(path))


def test_an_unsupported_tensor_type_is_named(tmp_path):
    spec = TinySpec("llama", layers=1, types={"attn_q": "IQ4_NL"})
    path = write_tiny(tmp_path / "iq.gguf", spec)
    with pytest.raises(UnsupportedQuantization, match="IQ4_NL is not supported; supported: F32"):
        load_model(str(path))


def test_a_tensor_that_contradicts_the_metadata_is_named(tmp_path):
    spec = TinySpec("llama", layers=1, metadata={"feed_forward_length": 384})
    path = write_tiny(tmp_path / "ffn.gguf", spec)
    with pytest.raises(ModelFileError, match=r"'blk.0.ffn_gate.weight' has shape \(512, 256\), "
                       r"expected \(384, 256\)"):
        load_model(str(path))


def test_not_enough_memory_is_refused_with_the_figures(tiny_llama):
    with pytest.raises(NotEnoughMemory, match=r"needs 4\.\d MiB as float32 weights .* only "
                       r"1\.0 MiB of memory is available"):
        load_model(str(tiny_llama), available=2**20)


def test_weights_report_how_they_are_held(tiny_llama):
    model = load_model(str(tiny_llama))
    weights = model.describe()["weights"]
    assert weights["dtype"] == "float32"
    assert weights["bytes"] == model.weights.nbytes > weights["file_bytes"]
    assert weights["source_types"]["Q4_K"] == 2 and not weights["tied_output"]
    layer = model.weights.layers[0]
    assert layer.wqkv.shape == (256 + 2 * 128, 256) and layer.wqkv.flags.c_contiguous
    assert layer.wgu.shape == (2 * 512, 256)


def test_the_model_package_is_light_to_import():
    # velod.model is a leaf: reading a name or a manifest must not pull in NumPy or gguf.
    import subprocess
    import sys

    code = ("import sys, velod.model.store, velod.model.gguf; "
            "print(sorted(m for m in ('numpy', 'gguf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
