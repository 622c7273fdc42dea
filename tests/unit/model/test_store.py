"""Models found through Ollama's store on disk (manifest -> model layer -> blob), or a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from velod.engine.models import load_model
from velod.model.store import (
    ManifestError,
    ModelNotFoundError,
    models_dirs,
    parse_name,
    resolve,
)


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
