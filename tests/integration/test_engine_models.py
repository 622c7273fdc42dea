"""A language model in the real daemon: engine.model names a GGUF (a path, or an Ollama name
found in a store on disk), loaded when velod starts, velodctl drives it, and a model that
cannot load is a clear error (the engine degraded) while the daemon carries on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.tiny_vocab import spm_metadata
from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny
from tests.unit.model.test_store import make_store
from velod.control.client import RemoteError


def engine(model: str, **changes: Any) -> dict[str, Any]:
    return {"engine": {"model": model, "dtype": "float32", "device": "cpu",
                       "kv_cache": "8MiB", "max_batch_size": 8, "max_tokens_per_step": 64,
                       **changes}}


def ctl_json(daemon: Any, *args: str) -> Any:
    return json.loads(daemon.ctl(*args, "--json").stdout)


def loaded_status(daemon: Any) -> dict[str, Any]:
    """engine.status once the configured model's load has ended (loaded or not)."""
    return wait_for(lambda: (s := daemon.call("engine.status"))["state"] != "loading" and s,
                    what="the model's load to end")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("models") / "gemma3.gguf", SPECS["gemma3"],
                      vocab=spm_metadata())


def test_a_gguf_model_loads_when_the_daemon_starts_and_status_says_what_it_is(velod_factory,
                                                                              gemma):
    d = velod_factory(engine(str(gemma)))
    before = loaded_status(d)
    assert before["model"]["synthetic"] is False and before["model"]["loaded"] is True
    assert before["pool"]["allocated"] is False  # the pool comes with the first request
    assert d.call("system.status")["components"]["engine"]["state"] == "running"

    done = ctl_json(d, "engine", "submit", "--prompt", "3,1,4,1,5", "--max-new-tokens", "6",
                    "--wait")
    assert done["finished"]["reason"] == "length"
    assert len(done["finished"]["output_token_ids"]) == 6

    status = ctl_json(d, "engine", "status")
    model = status["model"]
    assert (model["name"], model["display_name"]) == (str(gemma), "tiny-gemma3")
    assert model["architecture"] == "gemma3" and model["path"] == str(gemma)
    assert model["weights"]["dtype"] == "float32"
    assert status["pool"]["window"]["layers"] == 5
    text = d.ctl("engine", "status").stdout
    assert f"model: {gemma} (tiny-gemma3), gemma3, " in text and "MiB float32" in text
    assert "window pool:" in text and "5 layers with a 6-token window" in text


def test_an_ollama_name_is_found_in_the_store_the_daemon_is_told_of(velod_factory, gemma,
                                                                     tmp_path):
    blob = make_store(tmp_path / "models", "tiny", "q8", gemma.read_bytes())
    d = velod_factory(engine("tiny:q8"), env={"OLLAMA_MODELS": str(tmp_path / "models")})
    done = ctl_json(d, "engine", "submit", "--prompt", "1,2", "--max-new-tokens", "2", "--wait")
    # Greedy on random weights: this prompt's second token is the vocabulary's end of text.
    assert done["finished"]["reason"] in ("length", "stop")
    assert 1 <= len(done["finished"]["output_token_ids"]) <= 2
    model = ctl_json(d, "engine", "status")["model"]
    assert model["path"] == str(blob) and model["digest"] == "sha256:" + "a" * 64


@pytest.mark.parametrize(("model", "message"), [
    ("cut", "truncated or corrupt"),
    ("nowhere:latest", "no such model in Ollama's store"),
])
def test_a_model_that_cannot_load_is_an_error_and_the_daemon_stays_up(velod_factory, gemma,
                                                                       tmp_path, model,
                                                                       message):
    if model == "cut":
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(gemma.read_bytes()[:4096])
        model = str(cut)
    d = velod_factory(engine(model), env={"OLLAMA_MODELS": str(tmp_path / "empty")})
    status = loaded_status(d)
    assert message in status["error"] and status["model"]["loaded"] is False
    component = d.call("system.status")["components"]["engine"]
    assert component["state"] == "degraded" and message in component["error"]
    with pytest.raises(RemoteError) as info:
        d.call("engine.submit", {"prompt": [1, 2, 3], "max_new_tokens": 2})
    assert info.value.code == "unavailable" and message in info.value.message
    assert d.call("system.hello")["name"] == "velod"  # still serving
