"""The applier against the fake systemctl (a real subprocess) and the fake Ollama process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.fake_ollama import free_port
from velod.config import OllamaConfig, TunerConfig
from velod.hardware.snapshot import Cpu, Gpu, Memory, OsInfo, Snapshot
from velod.tuner.applier import Applier, IdleTracker, model_parameters, server_environment
from velod.tuner.backends.ollama_backend import OllamaBackend
from velod.tuner.history import History
from velod.tuner.planner import ModelPlan, Plan, Recommendation
from velod.tuner.state import LoadedModel, OllamaState

REPO = Path(__file__).resolve().parents[3]
FAKE_BIN = REPO / "tests" / "fakes" / "bin"
FAKE_OLLAMA = REPO / "tests" / "fakes" / "fake_ollama.py"
UNIT = "ollama.service"
GIB = 1024**3


def make_plan(server: dict[str, str], model_params: dict[str, dict[str, str]] | None = None,
              on_gpu: tuple[str, ...] = ("llama3.1:8b",)) -> Plan:
    recs = {k: Recommendation(k, v, "test", None) for k, v in server.items()}
    params = {m: {k: Recommendation(k, v, "test", None) for k, v in p.items()}
              for m, p in (model_params or {}).items()}
    models = {name: ModelPlan(name=name, source="installed", context=8192, parallel=1,
                              kv_cache_type="f16", weights=5 * GIB, kv_cache=GIB, overhead=GIB,
                              gpus=[0], gpu_layers=32, layers=32, fully_on_gpu=True,
                              trained_context=131072) for name in on_gpu}
    return Plan(version="0.33.0", profile="balanced", cpu_only=False, server=recs,
                model_params=params, budgets=[], models=models, skipped={}, notes=[])


class Rig:
    """A systemd directory, the fake systemctl's state, and an Applier wired to them."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp = tmp
        self.systemd_dir = tmp / "systemd"
        self.systemd_dir.mkdir()
        self.state = tmp / "systemctl-state"
        self.state.mkdir()
        self.log = tmp / "systemctl.log"
        self.url = f"http://127.0.0.1:{port}"
        (self.state / f"{UNIT}.json").write_text(json.dumps({
            "argv": [sys.executable, str(FAKE_OLLAMA), "--port", str(port)],
            "env": {"FAKE_OLLAMA_VRAM": "24GiB", "PATH": "/usr/bin:/bin"},
            "log": str(tmp / "ollama.log")}))
        self.ollama = OllamaConfig(url=self.url, systemd_dir=str(self.systemd_dir),
                                   systemctl=str(FAKE_BIN / "systemctl"), request_timeout=1.0)
        self.tuner = TunerConfig(mode="apply", restart_when_idle_for=0.0,
                                 min_restart_interval=0.0)
        self.backend = OllamaBackend(self.ollama)
        self.client = self.backend.client
        self.history = History(tmp / "state")
        self.applier = Applier(self.backend, self.tuner, self.history)

    def calls(self) -> list[list[str]]:
        """The systemctl calls that change something (``show`` only reads)."""
        if not self.log.exists():
            return []
        argvs = [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]
        return [argv for argv in argvs if argv[:1] != ["show"]]

    def shows(self) -> int:
        text = self.log.read_text() if self.log.exists() else ""
        return sum(1 for line in text.splitlines() if json.loads(line)["argv"][:1] == ["show"])

    async def ollama_env(self) -> dict[str, str]:
        state = await self.client.request("GET", "/_fake/state")
        return state["env"]

    def fail_next_restart(self, how: str) -> None:
        (self.state / f"{UNIT}.next-restart").write_text(how)


@pytest_asyncio.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    port = free_port()
    monkeypatch.setenv("FAKE_SYSTEMCTL_STATE", str(tmp_path / "systemctl-state"))
    monkeypatch.setenv("FAKE_SYSTEMCTL_LOG", str(tmp_path / "systemctl.log"))
    monkeypatch.setenv("FAKE_SYSTEMCTL_SYSTEMD_DIR", str(tmp_path / "systemd"))
    rig = Rig(tmp_path, port)
    await rig.applier.systemctl("start", UNIT)
    await rig.applier.wait_ready()
    rig.log.unlink()
    try:
        yield rig
    finally:
        await rig.applier.systemctl("stop", UNIT)
        await rig.client.close()


@pytest.mark.asyncio
async def test_apply_writes_reloads_restarts_and_ollama_reads_the_new_environment(
        rig: Rig) -> None:
    plan = make_plan({"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_CONTEXT_LENGTH": "8192"})
    outcome = await rig.applier.apply(plan, "test", {"OLLAMA_NUM_PARALLEL": [None, "2"]})
    assert outcome.decision == "applied", outcome.message
    assert rig.calls() == [["daemon-reload"], ["restart", UNIT]]
    env = await rig.ollama_env()
    assert env["OLLAMA_NUM_PARALLEL"] == "2" and env["OLLAMA_CONTEXT_LENGTH"] == "8192"
    applying, entry = rig.history.last(5)
    assert applying["decision"] == "applying" and applying["action"] == "apply"
    assert applying["environment"] == server_environment(plan)
    assert entry["decision"] == "applied" and entry["restarted"] is True
    assert entry["running"] == "process"  # checked in /proc/<pid>/environ, not assumed
    assert rig.shows() == 1
    assert rig.applier.pending_verification is not None


@pytest.mark.asyncio
async def test_applying_the_same_settings_twice_restarts_once(rig: Rig) -> None:
    plan = make_plan({"OLLAMA_NUM_PARALLEL": "2"})
    await rig.applier.apply(plan, "test", {})
    second = await rig.applier.apply(plan, "test", {})
    assert second.decision == "skipped"
    assert [c for c in rig.calls() if c[0] == "restart"] == [["restart", UNIT]]


@pytest.mark.asyncio
async def test_failed_restart_restores_the_previous_drop_in(rig: Rig) -> None:
    await rig.applier.apply(make_plan({"OLLAMA_NUM_PARALLEL": "2"}), "first", {})
    rig.fail_next_restart("fail")
    outcome = await rig.applier.apply(make_plan({"OLLAMA_NUM_PARALLEL": "3"}), "second", {})
    assert outcome.decision == "rolled-back", outcome.message
    assert "exit 1" in outcome.message
    assert rig.applier.dropins.read_velod() == {"OLLAMA_NUM_PARALLEL": "2"}
    assert (await rig.ollama_env())["OLLAMA_NUM_PARALLEL"] == "2"
    assert [e["decision"] for e in rig.history.last(5)] == [
        "applying", "applied", "applying", "applying", "rolled-back"]
    assert [e.get("action") for e in rig.history.last(5)][2:4] == ["apply", "rollback"]


@pytest.mark.asyncio
async def test_ollama_not_coming_back_is_rolled_back_within_the_bound(rig: Rig) -> None:
    rig.fail_next_restart("no-come-back")
    started = time.monotonic()
    outcome = await rig.applier.apply(make_plan({"OLLAMA_NUM_PARALLEL": "4"}), "t", {})
    assert outcome.decision == "rolled-back", outcome.message
    assert "did not answer within" in outcome.message
    assert time.monotonic() - started < rig.applier.ready_timeout + 5
    assert not rig.applier.dropins.path.exists()  # there was no drop-in before
    assert "OLLAMA_NUM_PARALLEL" not in await rig.ollama_env()
    restarts = [c for c in rig.calls() if c[0] == "restart"]
    assert len(restarts) == 2


@pytest.mark.asyncio
async def test_admin_rollback_restores_and_restarts(rig: Rig) -> None:
    await rig.applier.apply(make_plan({"OLLAMA_KEEP_ALIVE": "10m"}), "a", {})
    await rig.applier.apply(make_plan({"OLLAMA_KEEP_ALIVE": "20m"}), "b", {})
    outcome = await rig.applier.rollback("asked by admin")
    assert outcome.decision == "rolled-back"
    assert (await rig.ollama_env())["OLLAMA_KEEP_ALIVE"] == "10m"
    again = await rig.applier.rollback("twice")
    assert again.decision == "error" and "nothing to roll back" in again.message


@pytest.mark.asyncio
async def test_spill_after_the_next_load_rolls_back(rig: Rig) -> None:
    await rig.applier.apply(make_plan({"OLLAMA_NUM_PARALLEL": "1"}), "a", {})
    spilling = make_plan({"OLLAMA_NUM_PARALLEL": "8", "OLLAMA_CONTEXT_LENGTH": "131072"})
    await rig.applier.apply(spilling, "b", {})
    nothing = OllamaState(version="0.33.0", loaded=[])
    assert await rig.applier.verify(nothing) is None  # nothing loaded yet: keep waiting
    await rig.client.request("POST", "/api/generate", {"model": "llama3.1:8b", "prompt": "",
                                                       "stream": False})
    outcome = await rig.applier.verify(await rig.client.fetch_state())
    assert outcome is not None and outcome.decision == "rolled-back", outcome
    assert "spilled to the CPU" in outcome.message
    assert (await rig.ollama_env())["OLLAMA_NUM_PARALLEL"] == "1"


@pytest.mark.asyncio
async def test_fitting_load_is_verified(rig: Rig) -> None:
    await rig.applier.apply(make_plan({"OLLAMA_CONTEXT_LENGTH": "8192"}), "a", {})
    await rig.client.request("POST", "/api/generate", {"model": "llama3.1:8b", "prompt": "",
                                                       "stream": False})
    outcome = await rig.applier.verify(await rig.client.fetch_state())
    assert outcome is not None and outcome.decision == "verified"
    assert outcome.details["loaded"][0]["context_length"] == 8192


@pytest.mark.asyncio
async def test_variants_are_created_once_and_the_users_model_is_untouched(rig: Rig) -> None:
    plan = make_plan({}, {"llama3.1:8b": {"num_ctx": "8192", "num_batch": "512"}})
    before = await rig.client.show("llama3.1:8b")
    (outcome,) = await rig.applier.apply_variants(plan, set())
    assert outcome.decision == "applied" and outcome.details["variant"] == "llama3.1:8b-velod"
    show = await rig.client.show("llama3.1:8b-velod")
    assert "8192" in show["parameters"]
    assert await rig.client.show("llama3.1:8b") == before
    installed = {t["name"] for t in await rig.client.tags()}
    assert await rig.applier.apply_variants(plan, installed) == []


def test_gate_rate_limits_and_waits_for_idle(tmp_path: Path) -> None:
    tuner = TunerConfig(restart_when_idle_for=60.0, min_restart_interval=600.0)
    applier = Applier(OllamaBackend(OllamaConfig(url="http://127.0.0.1:1")), tuner,
                      History(tmp_path))
    applier.idle.last_active = time.monotonic() - 5
    busy = applier.gate()
    assert busy is not None and busy.decision == "skipped-busy"
    applier.idle.last_active = time.monotonic() - 120
    assert applier.gate() is None
    applier.last_restart = time.time() - 30
    limited = applier.gate()
    assert limited is not None and limited.decision == "skipped-rate-limited"
    assert "tuner.min_restart_interval" in limited.message
    assert applier.gate(force=True) is None


def test_last_restart_survives_a_daemon_restart(tmp_path: Path) -> None:
    History(tmp_path).append("applied", restarted=True)
    History(tmp_path).append("applied", target="variant", variant="m-velod", parameters={})
    applier = Applier(OllamaBackend(OllamaConfig(url="http://127.0.0.1:1")),
                      TunerConfig(min_restart_interval=600.0), History(tmp_path))
    assert applier.last_restart is not None
    gate = applier.gate()
    assert gate is not None and gate.decision == "skipped-rate-limited"


def _snapshot(util: float | None) -> Snapshot:
    return Snapshot(time=0, gpus=(Gpu(0, "nvidia", "g", utilization_gpu=util),),
                    cpu=Cpu(None, 4, 8), memory=Memory(8 * GIB, 4 * GIB),
                    os=OsInfo("Linux", "6", "x86_64"))


def _ollama_activity(*loaded: LoadedModel) -> tuple[Any, bool, bool]:
    backend = OllamaBackend(OllamaConfig(url="http://127.0.0.1:1"))
    return backend.activity(OllamaState(version="0.33.0", loaded=list(loaded)))


def test_idle_tracker_sees_expiry_changes_and_gpu_work() -> None:
    tracker = IdleTracker(last_active=0.0)
    model = LoadedModel("m", 10, 10, 4096, expires_at="2026-01-01T00:05:00Z")
    tracker.observe(*_ollama_activity(model), _snapshot(0.0), now=100.0)
    assert tracker.idle_for(now=100.0) == 100.0  # first sight: nothing to compare with
    tracker.observe(*_ollama_activity(model), _snapshot(0.0), now=110.0)
    assert tracker.idle_for(now=110.0) == 110.0
    moved = LoadedModel("m", 10, 10, 4096, expires_at="2026-01-01T00:06:00Z")
    tracker.observe(*_ollama_activity(moved), _snapshot(0.0), now=120.0)
    assert tracker.idle_for(now=125.0) == 5.0
    tracker.observe(*_ollama_activity(moved), _snapshot(95.0), now=130.0)
    assert tracker.idle_for(now=130.0) == 0.0


def test_gpu_work_without_ollama_models_is_not_ollama_being_busy() -> None:
    tracker = IdleTracker(last_active=0.0)
    tracker.observe(*_ollama_activity(), _snapshot(99.0), now=50.0)
    assert tracker.idle_for(now=50.0) == 50.0


def test_a_request_in_flight_counts_as_busy_even_when_nothing_moved() -> None:
    tracker = IdleTracker(last_active=0.0)
    tracker.observe("same", False, True, None, now=10.0)
    tracker.observe("same", True, True, None, now=20.0)
    assert tracker.idle_for(now=25.0) == 5.0


def test_model_parameters_become_numbers_where_they_are() -> None:
    recs: dict[str, Any] = {"num_ctx": Recommendation("num_ctx", "8192", "", None),
                            "temperature": Recommendation("temperature", "0.7", "", None),
                            "stop": Recommendation("stop", "<eot>", "", None)}
    assert model_parameters(recs) == {"num_ctx": 8192, "temperature": 0.7, "stop": "<eot>"}
