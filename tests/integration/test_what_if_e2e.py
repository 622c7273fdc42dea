"""What-if plans for installed models: their own metadata first, velod's catalog after.

The fake Ollama has gemma3:270m installed, which velod's catalog does not know; ``/api/show``
gives its ``model_info`` (the GGUF's keys, as Ollama reports them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_ollama import DEFAULT_MODELS, free_port
from tests.integration.conftest import wait_for
from tests.unit.model.test_kv import GEMMA3_270M
from velod.model import catalog

FAKE_OLLAMA = Path(__file__).resolve().parents[2] / "tests" / "fakes" / "fake_ollama.py"


@pytest.fixture
def ollama_with_gemma(tmp_path: Path) -> Iterator[str]:
    models = tmp_path / "models.json"
    gemma = {"name": "gemma3:270m", "size": 291554930, "family": "gemma3",
             "parameter_size": "268.10M", "model_info": GEMMA3_270M.to_metadata()}
    models.write_text(json.dumps([gemma, DEFAULT_MODELS[1]]))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_OLLAMA), "--port", str(port),
                             "--models", str(models)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(up, what="the fake Ollama")
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_an_installed_model_the_catalog_lacks_is_planned_from_its_own_metadata(
        ollama_with_gemma: str, velod_factory: Any) -> None:
    assert catalog.lookup("gemma3:270m") is None
    d = velod_factory({"ollama": {"url": ollama_with_gemma}})
    wait_for(lambda: d.call("ollama.status")["reachable"], what="Ollama polled")
    out = d.ctl("--json", "tune", "plan", "--vram", "24GiB", "--gpus", "1", "--model",
                "gemma3:270m", "--model", "llama3.1:8b", "--model", "nope:1b")
    plan = json.loads(out.stdout)["plan"]
    assert plan["models"]["gemma3:270m"]["source"] == "installed"
    assert plan["models"]["llama3.1:8b"]["source"] == "catalog"
    assert "not installed and not in velod's catalog" in plan["skipped"]["nope:1b"]
    assert "llama3.2:3b" not in plan["models"]  # installed, but not asked for
    # Sized per layer kind from /api/show: 3 full layers hold the context, 15 a window.
    gemma = plan["models"]["gemma3:270m"]
    windowed = 15 * 1024 * min(gemma["context"], 1024)
    assert gemma["kv_cache"] == gemma["parallel"] * (3 * 1024 * gemma["context"] + windowed)
    text = d.ctl("tune", "plan", "--vram", "24GiB", "--model", "gemma3:270m",
                 "--model", "llama3.1:8b").stdout
    assert "installed (/api/show)" in text and "velod's catalog (not installed)" in text
