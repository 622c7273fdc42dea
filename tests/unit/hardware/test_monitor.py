"""The hardware monitor component with the fake pynvml injected: events, health, history."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fakes.fake_gpus import GiB, gpu, load_fake_pynvml, write_gpu_table
from tests.fakes.sysfs import add_card
from velod.bus import Bus, Event
from velod.component import Context
from velod.config import Config, HardwareConfig
from velod.control.registry import RpcError, methods_of
from velod.errors import ServiceError
from velod.hardware import rpc
from velod.hardware.service import HardwareMonitor, backoff
from velod.hardware.snapshot import Snapshot

pytestmark = pytest.mark.asyncio


class Harness:
    def __init__(self, tmp: Path, nvml: ModuleType, **hardware: Any) -> None:
        self.bus = Bus()
        self.events: list[Event] = []
        self.bus.subscribe(["hardware.*"], self.events.append)
        hw = {"sysfs_root": str(tmp / "sys"), "interval": 0.1, "timeout": 0.3, **hardware}
        ctx = Context(Config(hardware=HardwareConfig(**hw)), self.bus, tmp,
                      logging.getLogger("test"))
        self.monitor = HardwareMonitor(ctx, nvml_module=nvml)

    def changes(self) -> list[dict[str, Any]]:
        return [c for e in self.events if e.topic == "hardware.changed"
                for c in e.data["changes"]]

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call a control method the way the daemon binds it (``velod.hardware.rpc``)."""
        (m,) = [m for m in methods_of(rpc, self.monitor) if m.name == method]
        return await m.handler(params or {}, None)  # type: ignore[arg-type]


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return write_gpu_table(tmp_path / "nvml.json", [gpu("A"), gpu("B")])


@pytest.fixture
def nvml(table: Path) -> ModuleType:
    return load_fake_pynvml(table)


async def test_each_poll_publishes_a_snapshot_of_every_source(tmp_path: Path, nvml) -> None:
    add_card(tmp_path / "sys", 0, product_name="Radeon")
    h = Harness(tmp_path, nvml)
    snap = await h.monitor.poll()
    assert [(g.vendor, g.name) for g in snap.gpus] == [("nvidia", "A"), ("nvidia", "B"),
                                                       ("amd", "Radeon")]
    (event,) = h.events
    assert event.topic == "hardware.snapshot"
    assert Snapshot.from_dict(event.data["snapshot"]) == snap
    assert h.changes() == []  # the first snapshot is not a change


async def test_hardware_get_returns_the_snapshot_and_source_health(tmp_path: Path,
                                                                   nvml) -> None:
    h = Harness(tmp_path, nvml)
    await h.monitor.poll()
    result = await h.call("hardware.get")
    assert [g["name"] for g in result["snapshot"]["gpus"]] == ["A", "B"]
    assert set(result["sources"]) == {"host", "amd", "nvidia"}
    assert all(s["state"] == "ok" for s in result["sources"].values())
    assert "no AMD GPU" in result["snapshot"]["gpu_notes"]["amd"]


async def test_without_a_driver_there_is_no_gpu_and_the_reason_is_kept(tmp_path: Path) -> None:
    h = Harness(tmp_path, load_fake_pynvml(None))
    h.monitor.state = "running"
    snap = await h.monitor.poll()
    assert snap.gpus == ()
    assert "not found" in snap.gpu_notes["nvidia"]
    assert h.monitor.state == "running" and h.monitor.error is None  # not a fault
    assert h.monitor.status()["sources"]["nvidia"]["state"] == "ok"


async def test_changes_in_the_table_become_change_events(tmp_path: Path, table: Path,
                                                         nvml) -> None:
    h = Harness(tmp_path, nvml)
    await h.monitor.poll()
    write_gpu_table(table, [gpu("A", processes=[{"pid": 4242, "used_memory": 6 * GiB}])])
    await h.monitor.poll()
    kinds = [(c["kind"], c["gpu"]) for c in h.changes()]
    assert kinds == [("vram_free", 0), ("gpu_process_started", 0), ("gpu_removed", 1)]
    vram = h.changes()[0]
    assert (vram["old"], vram["new"]) == (24 * GiB, 18 * GiB)
    h.events.clear()
    await h.monitor.poll()  # nothing moved since
    assert h.changes() == []


async def test_slow_drift_adds_up_until_it_counts(tmp_path: Path, table: Path, nvml) -> None:
    h = Harness(tmp_path, nvml)
    await h.monitor.poll()
    for used in (200, 400, 600):  # MiB; each step is below the 512 MiB threshold
        write_gpu_table(table, [gpu("A", memory_used=used * 1024**2), gpu("B")])
        await h.monitor.poll()
    assert [(c["kind"], c["old"], c["new"]) for c in h.changes()] == [
        ("vram_free", 24 * GiB, 24 * GiB - 600 * 1024**2)]


async def test_xid_errors_are_published(tmp_path: Path, table: Path, nvml) -> None:
    h = Harness(tmp_path, nvml)
    await h.monitor.poll()
    write_gpu_table(table, [gpu("A"), gpu("B", xid_events=[79])])
    await h.monitor.poll()
    (change,) = h.changes()
    assert (change["kind"], change["gpu"], change["new"]) == ("gpu_xid", 1, 79)


async def test_a_hung_nvml_degrades_the_monitor_then_it_recovers(tmp_path: Path, table: Path,
                                                                 nvml) -> None:
    h = Harness(tmp_path, nvml, timeout=0.2)
    h.monitor.state = "running"
    await h.monitor.poll()
    write_gpu_table(table, [gpu("A"), gpu("B")],
                    hang_seconds={"nvmlDeviceGetCount": 0.8})
    started = time.monotonic()
    snap = await h.monitor.poll()
    assert time.monotonic() - started < 0.7  # the poll gave up at the timeout
    assert h.monitor.state == "degraded"
    assert "no answer within 0.2s" in h.monitor.error
    nvidia = h.monitor.status()["sources"]["nvidia"]
    assert nvidia["state"] == "failing" and nvidia["hung"] and nvidia["failures"] == 1
    # The host part still comes through; the last GPU rows stay, marked stale.
    assert snap.memory.total > 0
    assert [g.error for g in snap.gpus] == ["stale: no answer within 0.2s (driver hung?)"] * 2
    assert [c["kind"] for c in h.changes()] == ["gpu_error", "gpu_error"]
    # While the call hangs, it is not started again.
    await h.monitor.poll()
    assert h.monitor.status()["sources"]["nvidia"]["failures"] == 1
    write_gpu_table(table, [gpu("A"), gpu("B")])
    await asyncio.sleep(0.9)  # the hung call returns (its result is dropped)
    snap = await h.monitor.poll()
    assert h.monitor.state == "running" and h.monitor.error is None
    assert [g.error for g in snap.gpus] == [None, None]
    assert [c["kind"] for c in h.changes()][-2:] == ["gpu_error", "gpu_error"]


async def test_a_failing_source_is_retried_with_exponential_back_off(tmp_path: Path,
                                                                     table: Path,
                                                                     nvml) -> None:
    h = Harness(tmp_path, nvml, interval=0.1)
    write_gpu_table(table, [gpu()], **{"raise": {"nvmlDeviceGetCount": "Unknown"}})
    await h.monitor.poll()
    first = h.monitor.status()["sources"]["nvidia"]
    assert first["failures"] == 1 and 0 < first["retry_in"] <= 0.1
    await h.monitor.poll()  # not due yet: no new attempt
    assert h.monitor.status()["sources"]["nvidia"]["failures"] == 1
    await asyncio.sleep(0.11)
    await h.monitor.poll()
    second = h.monitor.status()["sources"]["nvidia"]
    assert second["failures"] == 2 and 0.1 < second["retry_in"] <= 0.2
    assert "NVMLError_Unknown" in second["error"]
    assert [backoff(5, n) for n in (1, 2, 3, 10)] == [5, 10, 20, 300]


async def test_the_loop_polls_on_the_interval_and_stop_shuts_nvml_down(tmp_path: Path,
                                                                       nvml) -> None:
    h = Harness(tmp_path, nvml, interval=0.1)
    await h.monitor.start()
    await asyncio.sleep(0.45)
    snapshots = [e for e in h.events if e.topic == "hardware.snapshot"]
    assert 3 <= len(snapshots) <= 6
    assert nvml._state.refcount == 1
    await h.monitor.stop()
    assert h.monitor.state == "stopped"
    assert nvml._state.refcount == 0


async def test_reconfigure_adopts_interval_thresholds_root_and_nvml_flag(tmp_path: Path,
                                                                         table: Path,
                                                                         nvml) -> None:
    h = Harness(tmp_path, nvml, interval=5.0)
    await h.monitor.start()
    await asyncio.sleep(0.05)
    add_card(tmp_path / "other-sys", 0)
    new = Config(hardware=HardwareConfig(interval=0.1, sysfs_root=str(tmp_path / "other-sys"),
                                         nvml=False, vram_change_threshold=GiB))
    await h.monitor.reconfigure(new)
    await asyncio.sleep(0.35)
    snapshots = [e for e in h.events if e.topic == "hardware.snapshot"]
    assert len(snapshots) >= 3  # the new interval, not 5 s
    latest = Snapshot.from_dict(snapshots[-1].data["snapshot"])
    assert [g.vendor for g in latest.gpus] == ["amd"]
    assert latest.gpu_notes["nvidia"] == "NVML disabled (hardware.nvml: false)"
    assert nvml._state.refcount == 0  # NVML shut down when switched off
    assert "nvidia" not in h.monitor.status()["sources"]
    await h.monitor.reconfigure(Config(hardware=HardwareConfig(interval=0.1)))
    await asyncio.sleep(0.2)
    assert nvml._state.refcount == 1
    await h.monitor.stop()


async def test_history_keeps_the_last_samples_and_honours_limit(tmp_path: Path, nvml) -> None:
    h = Harness(tmp_path, nvml, history_size=3)
    for _ in range(5):
        await h.monitor.poll()
    history = await h.call("hardware.history")
    samples = history["samples"]
    assert len(samples) == 3
    assert samples == sorted(samples, key=lambda s: s["time"])
    assert set(samples[0]) == {"time", "cpu_utilization", "memory_available", "swap_used",
                               "gpus"}
    assert [g["index"] for g in samples[0]["gpus"]] == [0, 1]
    assert len((await h.call("hardware.history", {"limit": 2}))["samples"]) == 2
    with pytest.raises(RpcError) as err:
        await h.call("hardware.history", {"limit": 0})
    assert err.value.code == "invalid_params"


async def test_hardware_get_when_disabled_says_so(tmp_path: Path, nvml) -> None:
    h = Harness(tmp_path, nvml, enabled=False)
    await h.monitor.start()
    with pytest.raises(ServiceError) as err:
        await h.call("hardware.get")
    assert err.value.code == "unavailable" and "hardware.enabled" in err.value.message
    assert h.events == []
    await h.monitor.stop()


async def test_hardware_get_waits_for_the_first_poll(tmp_path: Path, nvml) -> None:
    h = Harness(tmp_path, nvml)
    await h.monitor.start()
    result = await h.call("hardware.get")  # called before the first poll has finished
    assert len(result["snapshot"]["gpus"]) == 2
    await h.monitor.stop()


async def test_disabling_by_reload_releases_nvml_and_enabling_resumes(tmp_path: Path,
                                                                      nvml) -> None:
    h = Harness(tmp_path, nvml, interval=0.1)
    await h.monitor.start()
    await h.call("hardware.get")
    assert nvml._state.refcount == 1
    await h.monitor.reconfigure(Config(hardware=HardwareConfig(enabled=False)))
    assert nvml._state.refcount == 0
    with pytest.raises(ServiceError) as err:
        await h.call("hardware.get")  # no stale snapshot is served
    assert err.value.code == "unavailable"
    await h.monitor.reconfigure(Config(hardware=HardwareConfig(interval=0.1)))
    result = await h.call("hardware.get")
    assert len(result["snapshot"]["gpus"]) == 2 and nvml._state.refcount == 1
    await h.monitor.stop()
    assert nvml._state.refcount == 0


async def test_stop_does_not_wait_for_a_hung_driver(tmp_path: Path, table: Path,
                                                    nvml) -> None:
    h = Harness(tmp_path, nvml, timeout=0.2)
    await h.monitor.poll()
    write_gpu_table(table, [gpu("A")], hang_seconds={"nvmlDeviceGetCount": 1.5})
    await h.monitor.poll()  # times out; the call stays hung in its thread
    hung = h.monitor._status["nvidia"]
    started = time.monotonic()
    await h.monitor.stop()
    assert time.monotonic() - started < 1.2  # gave up on NVML's shutdown after 1 s
    assert h.monitor.state == "stopped"
    # Let the hung call and the late shutdown end while this test's event loop still runs.
    while hung.running or nvml._state.refcount:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)
