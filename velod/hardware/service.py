"""The hardware monitor component: polls the sources, keeps history, publishes events.

Each poll reads every source (NVML, AMD sysfs, host) in its own worker thread with the
configured timeout, so a hung driver cannot stall the daemon. A source that fails or hangs
is shown in ``status()`` and ``hardware.get`` and retried with exponential back-off; its last
GPU rows stay in the snapshot marked with the error. Events:

- ``hardware.snapshot`` every poll: ``{"snapshot": Snapshot.to_dict()}``;
- ``hardware.changed`` for meaningful changes only: ``{"changes": [Change.to_dict(), ...]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from velod.blocking import run_blocking
from velod.component import Component, Context
from velod.config import Config, HardwareConfig
from velod.errors import Unavailable
from velod.hardware.amd import AmdSource
from velod.hardware.changes import Change, Thresholds, detect_changes, xid_changes
from velod.hardware.host import HostReading, HostSource
from velod.hardware.nvml import NvmlSource
from velod.hardware.snapshot import Gpu, Snapshot

MAX_BACKOFF_S = 300.0
CLOSE_TIMEOUT_S = 1.0
GPU_SOURCES = ("nvidia", "amd")


@dataclass
class SourceStatus:
    """Health of one source, as shown by ``status()`` and ``hardware.get``."""

    name: str
    state: str = "ok"  # ok | failing
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0  # monotonic time of the next attempt while failing
    running: bool = False  # a call is still running in a worker thread (maybe hung)
    last_ok: float | None = None  # wall-clock time of the last good reading
    last_duration_ms: float | None = None

    def to_dict(self, now: float) -> dict[str, Any]:
        retry = max(0.0, self.retry_at - now) if self.state != "ok" else None
        return {"state": self.state, "error": self.error, "failures": self.failures,
                "retry_in": round(retry, 3) if retry is not None else None,
                "hung": self.running and self.state != "ok", "last_ok": self.last_ok,
                "last_duration_ms": self.last_duration_ms}


def backoff(interval: float, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: interval × 2^(n-1), capped."""
    return min(interval * 2 ** max(failures - 1, 0), max(MAX_BACKOFF_S, interval))


def sample(snapshot: Snapshot) -> dict[str, Any]:
    """The key figures of a snapshot, for ``hardware.history``."""
    return {
        "time": snapshot.time,
        "cpu_utilization": snapshot.cpu.utilization,
        "memory_available": snapshot.memory.available,
        "swap_used": snapshot.memory.swap_used,
        "gpus": [{"index": g.index, "vendor": g.vendor, "memory_used": g.memory_used,
                  "memory_free": g.memory_free, "utilization_gpu": g.utilization_gpu,
                  "temperature": g.temperature, "power_draw": g.power_draw}
                 for g in snapshot.gpus],
    }


class HardwareMonitor(Component):
    """Component ``hardware``; ``nvml_module`` replaces ``import pynvml`` (tests)."""

    name = "hardware"

    def __init__(self, ctx: Context, *, nvml_module: ModuleType | None = None) -> None:
        super().__init__(ctx)
        self._nvml_module = nvml_module
        self._sources: dict[str, Any] = {}
        self._status: dict[str, SourceStatus] = {}
        self._readings: dict[str, Any] = {}
        self._latest: Snapshot | None = None
        self._reference: Snapshot | None = None
        self._history: deque[dict[str, Any]] = deque(maxlen=self._hw.history_size)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._polled = asyncio.Event()
        self._build_sources(self._hw)

    @property
    def _hw(self) -> HardwareConfig:
        return self.config.hardware

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.state = "running"
        if self._hw.enabled:
            self._task = asyncio.create_task(self._loop(), name="hardware-monitor")

    async def stop(self) -> None:
        self.state = "stopping"
        await self._stop_loop()
        for name in list(self._sources):
            await self._close_source(name)
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        old, new = self._hw, config.hardware
        self.config = config
        if new.nvml != old.nvml and not new.nvml:
            await self._close_source("nvidia")
        if new.sysfs_root != old.sysfs_root:
            self._sources["amd"].sysfs_root = new.sysfs_root
            self._status["amd"] = SourceStatus("amd")
        self._build_sources(new)
        if new.history_size != self._history.maxlen:
            self._history = deque(self._history, maxlen=new.history_size)
        if new.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="hardware-monitor")
        elif not new.enabled and old.enabled:
            await self._disable()
        self._wake.set()  # poll now with the new settings, then keep the new interval

    async def _disable(self) -> None:
        """Stop polling, release NVML and forget the snapshot (it would only grow stale)."""
        await self._stop_loop()
        for name in list(self._sources):
            await self._close_source(name)
        self._latest = self._reference = None
        self._polled.clear()
        self._refresh_state()

    def _build_sources(self, hw: HardwareConfig) -> None:
        if "host" not in self._sources:
            self._sources["host"] = HostSource()
        if "amd" not in self._sources:
            self._sources["amd"] = AmdSource(hw.sysfs_root)
        if hw.nvml and "nvidia" not in self._sources:
            self._sources["nvidia"] = NvmlSource(self._nvml_module)
        for name in self._sources:
            self._status.setdefault(name, SourceStatus(name))

    async def _close_source(self, name: str) -> None:
        source = self._sources.pop(name, None)
        self._status.pop(name, None)
        self._readings.pop(name, None)
        if source is not None:
            with contextlib.suppress(Exception):  # a hung driver must not block shutdown
                await run_blocking(source.close, timeout=CLOSE_TIMEOUT_S)

    async def _stop_loop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except Exception as exc:  # never let one bad poll end monitoring
                self.log.exception("hardware poll failed")
                self.state, self.error = "degraded", f"poll failed: {exc}"
            self._wake.clear()
            delay = self._hw.interval - (time.monotonic() - started)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    # ------------------------------------------------------------------ polling

    async def poll(self) -> Snapshot | None:
        """Read the due sources, build and publish a snapshot; None while no host reading."""
        names = [n for n in self._sources if self._due(n)]
        await asyncio.gather(*(self._read(n) for n in names))
        self._refresh_state()
        snapshot = self._assemble()
        if snapshot is None:
            return None
        nvidia = self._readings.get("nvidia") if "nvidia" in names else None
        xids = nvidia.xids if nvidia is not None and self._status["nvidia"].state == "ok" else []
        changes = detect_changes(self._reference, snapshot, Thresholds.from_config(self._hw))
        changes += xid_changes(xids, snapshot)
        self._latest = snapshot
        if self._reference is None or changes:
            self._reference = snapshot
        self._history.append(sample(snapshot))
        self._polled.set()
        self.ctx.bus.publish("hardware.snapshot", {"snapshot": snapshot.to_dict()})
        if changes:
            self._publish_changes(changes)
        return snapshot

    def _publish_changes(self, changes: list[Change]) -> None:
        for change in changes:
            self.log.info("%s", change.message)
        self.ctx.bus.publish("hardware.changed", {"changes": [c.to_dict() for c in changes]})

    def _due(self, name: str) -> bool:
        status = self._status[name]
        return not status.running and time.monotonic() >= status.retry_at

    async def _read(self, name: str) -> None:
        source, status = self._sources[name], self._status[name]

        def call() -> Any:
            try:
                return source.read()
            finally:
                status.running = False  # seen by the loop thread; a bool store is atomic

        status.running = True
        started = time.monotonic()
        try:
            reading = await run_blocking(call, timeout=self._hw.timeout)
        except TimeoutError:
            self._fail(status, f"no answer within {self._hw.timeout:g}s (driver hung?)")
            return
        except Exception as exc:
            self._fail(status, f"{type(exc).__name__}: {exc}")
            return
        if self._sources.get(name) is not source:
            return  # closed or replaced by reconfigure while reading
        status.last_duration_ms = round((time.monotonic() - started) * 1000, 3)
        if status.state != "ok":
            self.log.info("hardware source %s recovered", name)
        self._readings[name] = reading
        status.state, status.error, status.failures = "ok", None, 0
        status.last_ok = time.time()

    def _fail(self, status: SourceStatus, error: str) -> None:
        status.failures += 1
        delay = backoff(self._hw.interval, status.failures)
        status.state, status.error = "failing", error
        status.retry_at = time.monotonic() + delay
        self.log.warning("hardware source %s failed (%s); retrying in %.1fs",
                         status.name, error, delay)

    def _refresh_state(self) -> None:
        failing = [s for s in self._status.values() if s.state != "ok"]
        self.error = "; ".join(f"{s.name}: {s.error}" for s in failing) or None
        if self.state in ("running", "degraded"):
            self.state = "degraded" if failing else "running"

    def _assemble(self) -> Snapshot | None:
        host: HostReading | None = self._readings.get("host")
        if host is None:
            return None
        gpus: list[Gpu] = []
        notes: dict[str, str] = {}
        for name in GPU_SOURCES:
            reading, status = self._readings.get(name), self._status.get(name)
            if status is None:
                notes[name] = "NVML disabled (hardware.nvml: false)"
                continue
            rows = list(reading.gpus) if reading is not None else []
            if status.state != "ok":
                rows = [dataclasses.replace(g, error=f"stale: {status.error}") for g in rows]
                notes[name] = f"{name} source failing: {status.error}"
            elif reading is not None and reading.note and not rows:
                notes[name] = reading.note
            gpus += rows
        return Snapshot(time=time.time(), gpus=tuple(gpus), cpu=host.cpu, memory=host.memory,
                        os=host.os, gpu_notes=notes)

    # ------------------------------------------------------------------ control

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"state": self.state, "error": self.error, "summary": self._summary(),
                "enabled": self._hw.enabled,
                "interval": self._hw.interval,
                "gpus": len(self._latest.gpus) if self._latest else None,
                "last_poll": self._latest.time if self._latest else None,
                "sources": {n: s.to_dict(now) for n, s in self._status.items()}}

    def _summary(self) -> str:
        if not self._hw.enabled:
            return "disabled (hardware.enabled: false)"
        if self._latest is None:
            return "waiting for the first poll"
        gpus = self._latest.gpus
        if not gpus:
            why = "; ".join(self._latest.gpu_notes.values())
            return f"no GPU ({why})" if why else "no GPU"
        names = ", ".join(f"{g.index}: {g.name or g.vendor.upper() + ' GPU'}"
                          + (" (error)" if g.error else "") for g in gpus)
        return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({names})"

    async def snapshot(self) -> dict[str, Any]:
        """The latest snapshot with each source's health (waits for a first poll under way)."""
        if self._latest is None:
            if not self._hw.enabled:
                raise Unavailable("hardware monitoring is disabled (hardware.enabled: false "
                                  "in the config)")
            with contextlib.suppress(TimeoutError):  # the first poll may still be running
                await asyncio.wait_for(self._polled.wait(), self._hw.timeout + 1)
        if self._latest is None:
            raise Unavailable(f"no hardware snapshot yet: {self.error or 'polling'}")
        status = self.status()
        return {"snapshot": self._latest.to_dict(), "sources": status["sources"],
                "enabled": self._hw.enabled, "interval": self._hw.interval,
                "state": self.state, "error": self.error}

    def history(self, limit: int | None = None) -> dict[str, Any]:
        """The last ``limit`` samples of the key figures (all kept ones by default)."""
        samples = list(self._history)
        return {"interval": self._hw.interval,
                "samples": samples[-limit:] if limit is not None else samples}
