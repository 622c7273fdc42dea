"""The tuner component in-process: triggers, settle, skips, back-off, methods, events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.fake_ollama import FakeOllama, serve
from velod.bus import Bus, Event
from velod.component import Context
from velod.config import parse_config
from velod.control.registry import RpcError, methods_of
from velod.errors import ServiceError
from velod.hardware.snapshot import Cpu, Gpu, Memory, OsInfo, Snapshot
from velod.tuner import rpc
from velod.tuner.servers import TunerService
from velod.tuner.service import Tuner, backoff

pytestmark = pytest.mark.asyncio
GIB = 1024**3
SPILLING = {"FAKE_OLLAMA_VRAM": "24GiB", "OLLAMA_NUM_PARALLEL": "4",
            "OLLAMA_CONTEXT_LENGTH": "65536", "FAKE_OLLAMA_PRELOAD": "llama3.1:8b"}


def snapshot(vram: int = 24 * GIB, util: float = 0.0) -> Snapshot:
    return Snapshot(time=0, gpus=(Gpu(0, "nvidia", "RTX 4090", memory_total=vram,
                                      memory_used=GIB, memory_free=vram - GIB,
                                      utilization_gpu=util, compute_capability=(8, 9)),),
                    cpu=Cpu("x", 8, 16), memory=Memory(64 * GIB, 48 * GIB),
                    os=OsInfo("Linux", "6", "x86_64"))


@dataclass
class Running:
    service: TunerService  # the component, as the daemon builds it
    tuner: Tuner  # its tuner of Ollama
    bus: Bus
    fake: FakeOllama
    url: str
    events: list[dict[str, Any]]
    systemd_dir: Path

    def method(self, name: str) -> Callable[..., Any]:
        """A control method bound to this tuner, as the daemon binds ``velod.tuner.rpc``."""
        return next(m.handler for m in methods_of(rpc, self.service) if m.name == name)

    async def call(self, name: str, params: dict[str, Any] | None = None) -> Any:
        return await self.method(name)(params or {}, None)

    def decisions(self) -> list[str]:
        return [e["decision"] for e in self.tuner.history.last(100)]


async def until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@pytest_asyncio.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[TunerService] = []
    servers: list[Any] = []

    async def start(tuner: dict[str, Any], env: dict[str, str] | None = None,
                    url: str | None = None) -> Running:
        fake = FakeOllama(env=SPILLING if env is None else env)
        server = serve(fake)
        servers.append(server)
        base = await server.__aenter__()
        config = parse_config({
            "ollama": {"url": url or base, "systemd_dir": str(tmp_path / "systemd"),
                       "systemctl": str(tmp_path / "no-systemctl-here"),
                       "request_timeout": "300ms"},
            "tuner": {"interval": "100ms", **tuner}})
        bus = Bus()
        events: list[dict[str, Any]] = []
        bus.subscribe(["tuner.decision"], lambda e: events.append(e.data))
        t = TunerService(Context(config, bus, tmp_path / "state", logging.getLogger("velod")))
        started.append(t)
        await t.start()
        bus.publish("hardware.snapshot", {"snapshot": snapshot().to_dict()})
        return Running(t, t.tuners["ollama"], bus, fake, base, events, tmp_path / "systemd")

    yield start
    for t in started:
        await t.stop()
    for server in servers:
        await server.__aexit__(None, None, None)


async def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(1.0, n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(60.0, 20) == 300.0
    assert backoff(0.2, 20) == pytest.approx(6.4)
    assert backoff(600.0, 3) == 600.0  # never shorter than the interval


async def test_observe_mode_plans_publishes_and_touches_nothing(make: Any) -> None:
    r = await make({"mode": "observe", "settle": "0s"})
    await until(lambda: "planned" in r.decisions())
    await asyncio.sleep(0.4)
    assert r.decisions() == ["planned"]  # recorded once, not every cycle
    assert r.events[0]["decision"] == "planned" and r.events[0]["mode"] == "observe"
    assert "CPU spill" in r.events[0]["reason"]
    assert not r.systemd_dir.exists()
    show = await r.call("tuner.show")
    assert not show["up_to_date"] and show["mode"] == "observe"
    assert {row["name"] for row in show["settings"]} >= {"OLLAMA_NUM_PARALLEL",
                                                        "OLLAMA_CONTEXT_LENGTH"}
    assert show["unit_found"] is False  # this fake Ollama runs outside systemd


async def test_a_change_waits_for_settle_before_anything_is_applied(make: Any) -> None:
    r = await make({"mode": "apply", "settle": "30s", "restart_when_idle_for": "0s"})
    await until(lambda: "planned" in r.decisions())
    await asyncio.sleep(0.4)
    assert r.decisions() == ["planned"]
    pending = r.tuner.status()["pending"]
    assert pending is not None and 29 < pending["settled_in"] <= 30


async def test_busy_ollama_is_skipped_once_and_never_restarted(make: Any) -> None:
    r = await make({"mode": "apply", "settle": "0s", "restart_when_idle_for": "1h"})
    await until(lambda: "skipped-busy" in r.decisions())
    await asyncio.sleep(0.4)
    assert r.decisions() == ["planned", "skipped-busy"]
    assert not r.systemd_dir.exists()  # nothing written while busy


async def test_a_failing_systemctl_is_an_error_that_is_not_retried_in_a_loop(
        make: Any) -> None:
    r = await make({"mode": "apply", "settle": "0s", "restart_when_idle_for": "0s"})
    await until(lambda: r.tuner.status()["last_decision"]
                and r.tuner.status()["last_decision"]["decision"] in ("rolled-back", "error"))
    await asyncio.sleep(0.5)
    decisions = r.decisions()
    assert decisions[0] == "planned" and len(decisions) == 2, decisions
    assert "no-systemctl-here" in r.tuner.history.last(1)[0]["message"]
    show = await r.call("tuner.show")
    assert show["blocked"] is not None


async def test_a_request_in_flight_holds_the_restart_until_ollama_is_idle(make: Any) -> None:
    env = {"FAKE_OLLAMA_VRAM": "24GiB", "OLLAMA_NUM_PARALLEL": "4"}
    r = await make({"mode": "apply", "settle": "0s", "restart_when_idle_for": "500ms"},
                   env=env)
    # A freshly loaded model serving its first request: /api/ps moves expires_at each poll.
    r.fake.load("llama3.1:8b", {}, None).in_flight += 1
    await until(lambda: "skipped-busy" in r.decisions())
    await asyncio.sleep(0.8)
    assert r.decisions() == ["planned", "skipped-busy"]
    loaded = r.fake.loaded["llama3.1:8b"]
    loaded.in_flight -= 1
    loaded.expires_at = 1e10  # the request finished; Ollama set the keep-alive deadline
    # Idle now: the gate opens and velod tries to apply (the test's systemctl is missing).
    await until(lambda: len(r.decisions()) == 3, timeout=5)
    assert r.decisions()[2] in ("rolled-back", "error")


@pytest.mark.parametrize(("mode", "message"), [("garbage", "non-JSON"), ("fail", "HTTP 500"),
                                               ("slow", "did not answer")])
async def test_a_broken_ollama_backs_off_and_recovers(make: Any, mode: str,
                                                      message: str) -> None:
    r = await make({"mode": "observe"}, env={"FAKE_OLLAMA_MODE": mode,
                                             "FAKE_OLLAMA_DELAY": "1"})
    status = await until(lambda: (s := r.service.status())["ollama"]["failures"] >= 3 and s)
    assert status["state"] == "degraded" and message in status["ollama"]["error"]
    assert status["ollama"]["reachable"] is False
    polls_before = len(r.fake.requests)
    await asyncio.sleep(0.5)
    assert len(r.fake.requests) - polls_before <= 3  # backing off, not hammering
    r.fake.mode = "ok"
    r.tuner.trigger("test")
    await until(lambda: r.service.status()["ollama"]["reachable"])
    assert r.tuner.status()["state"] == "running"


async def test_ollama_status_shows_the_cpu_gpu_split(make: Any) -> None:
    r = await make({"mode": "observe"})
    await until(lambda: r.tuner.ollama is not None)
    status = await r.call("ollama.status")
    (loaded,) = status["loaded"]
    assert status["reachable"] and status["version"] == "0.33.0"
    assert loaded["spills_to_cpu"] and 0 < loaded["gpu_percent"] < 100
    assert loaded["context_length"] == 65536


async def test_what_if_plan_and_parameter_checks(make: Any) -> None:
    r = await make({"mode": "observe"})
    result = await r.call("tuner.plan", {"vram": "80GiB", "gpus": 1, "ram": "256GiB",
                                         "models": ["llama3.1:8b"], "profile": "long-context"})
    assert result["what_if"] and result["plan"]["profile"] == "long-context"
    assert result["plan"]["budgets"][0]["total"] == 80 * GIB
    here = await r.call("tuner.plan")
    assert here["what_if"] is False
    with pytest.raises((RpcError, ServiceError)) as info:
        await r.call("tuner.plan", {"vram": "lots"})
    assert info.value.code == "invalid_params"
    with pytest.raises((RpcError, ServiceError)):
        await r.call("tuner.plan", {"profile": "fastest"})
    with pytest.raises((RpcError, ServiceError)):
        await r.call("tuner.history", {"limit": 0})


async def test_hardware_changed_wakes_the_tuner(make: Any) -> None:
    r = await make({"mode": "observe", "interval": "1h"})
    await until(lambda: r.tuner.plan is not None)
    r.bus.publish("hardware.snapshot", {"snapshot": snapshot(vram=80 * GIB).to_dict()})
    r.bus.publish("hardware.changed", {"changes": []})
    await until(lambda: r.tuner.plan and r.tuner.plan.budgets[0].total == 80 * GIB)


async def test_a_malformed_snapshot_event_is_ignored(make: Any) -> None:
    r = await make({"mode": "observe"})
    r.tuner._on_event(Event("hardware.snapshot", {"nope": 1}, 1))
    assert r.tuner.snapshot is not None


async def test_rollback_without_a_backup_is_not_found(make: Any) -> None:
    r = await make({"mode": "observe"})
    with pytest.raises((RpcError, ServiceError)) as info:
        await r.call("tuner.rollback")
    assert info.value.code == "not_found"


async def test_a_config_reload_replans_with_the_new_policy(make: Any) -> None:
    r = await make({"mode": "observe", "interval": "1h"})
    await until(lambda: r.tuner.plan is not None)
    new = parse_config({"ollama": {"url": r.url, "request_timeout": "300ms"},
                        "tuner": {"mode": "observe", "interval": "1h", "profile": "low-memory"}})
    await r.tuner.reconfigure(new)
    await until(lambda: r.tuner.plan and r.tuner.plan.profile == "low-memory")
    assert "reconfigure" in r.events[-1]["reason"]


async def test_hardware_events_do_not_cut_a_back_off_short(make: Any) -> None:
    r = await make({"mode": "observe", "interval": "200ms"}, env={"FAKE_OLLAMA_MODE": "fail"})
    await until(lambda: r.tuner.failures >= 3)  # next poll in 1.6 s
    before = len(r.fake.requests)
    for _ in range(20):
        r.bus.publish("hardware.changed", {"changes": []})
        await asyncio.sleep(0.02)
    assert len(r.fake.requests) - before <= 2


async def test_methods_answer_before_the_first_cycle_has_run(make: Any) -> None:
    r = await make({"mode": "observe"})
    assert r.tuner.last_poll is None and r.tuner.plan is None  # the loop has not run yet
    status = await r.call("ollama.status")
    assert status["reachable"] is True and status["loaded"]
    show = await r.call("tuner.show")
    assert show["settings"] and show["mode"] == "observe"


async def test_the_most_used_model_is_the_one_clients_keep_using(make: Any) -> None:
    r = await make({"mode": "observe", "models": ["qwen2.5:7b"]},
                   env={"FAKE_OLLAMA_VRAM": "24GiB"})
    installed = ["llama3.1:8b", "llama3.2:3b", "qwen2.5:7b"]
    assert r.tuner.most_used_model(installed) == "qwen2.5:7b"  # unused yet: tuner.models
    for _ in range(3):  # a client uses llama3.2:3b between polls
        await r.call("bench.run", {"model": "llama3.2:3b", "gen": 1, "repeat": 1})
        before = r.tuner.last_poll
        await until(lambda b=before: r.tuner.last_poll != b)
    assert r.tuner.most_used_model(installed) == "llama3.2:3b"
    assert r.tuner.most_used_model([]) is None


async def test_bench_methods_check_their_parameters(make: Any) -> None:
    r = await make({"mode": "observe"}, env={"FAKE_OLLAMA_VRAM": "24GiB"})
    for params in ({"concurrency": [0]}, {"prompts": ["poem"]}, {"gen": 0},
                   {"concurrency": "1"}):
        with pytest.raises((RpcError, ServiceError)) as err:
            await r.call("bench.run", params)
        assert err.value.code == "invalid_params"
    with pytest.raises((RpcError, ServiceError)) as err:
        await r.call("bench.show", {"id": "last"})
    assert err.value.code == "not_found"
    r.tuner.bench.running = {"id": "x"}
    with pytest.raises((RpcError, ServiceError)) as err:
        await r.call("bench.run", {})
    assert err.value.code == "busy"
