"""A component that cannot be created or started leaves the daemon serving, degraded, with the
error in status; every state change is logged once and reaches systemd's STATUS=."""

import asyncio
import logging
from pathlib import Path

import pytest

from velod import daemon as daemon_module
from velod.bus import Bus
from velod.capabilities import Capability
from velod.component import Component, Context
from velod.config import Config, parse_config

pytestmark = pytest.mark.asyncio


class BrokenAtCreation(Component):
    name = "broken-create"

    def __init__(self, ctx: Context) -> None:
        raise OverflowError("Python int too large to convert to C ssize_t")


class BrokenAtStart(Component):
    name = "broken-start"

    async def start(self) -> None:
        raise ValueError("unsupported scheme")


class Healthy(Component):
    name = "healthy"


def capabilities(*classes: type) -> tuple[Capability, ...]:
    """Rows of the capability table for test components (this module has no @rpc methods)."""
    return tuple(Capability(cls.name, f"{__name__}:{cls.__name__}", __name__, __name__, ())
                 for cls in classes)


class RecordingNotifier:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.watchdog_interval = None
        self.enabled = True

    def send(self, *fields: str) -> bool:
        self.sent.extend(fields)
        return True

    def close(self) -> None:
        pass


async def test_components_that_fail_leave_the_daemon_serving_degraded(monkeypatch, tmp_path):
    monkeypatch.setattr(daemon_module, "CAPABILITIES",
                        capabilities(BrokenAtCreation, BrokenAtStart, Healthy))
    config = parse_config({"state_dir": str(tmp_path / "state")})
    daemon = daemon_module.Daemon(config, tmp_path / "velod.yaml",
                                  socket_override=str(tmp_path / "s.sock"))
    daemon.notifier = RecordingNotifier()
    runner = asyncio.create_task(daemon.run())
    for _ in range(200):
        if daemon.server.path is not None and daemon.components:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    status = daemon.status()
    states = {name: (c["state"], c["error"]) for name, c in status["components"].items()}
    assert states["broken-create"] == ("failed", "could not be created: Python int too large "
                                                 "to convert to C ssize_t")
    assert states["broken-start"] == ("failed", "start failed: unsupported scheme")
    assert states["healthy"] == ("running", None)
    ready = [f for f in daemon.notifier.sent if f.startswith("STATUS=")][-1]
    assert "broken-start failed (start failed: unsupported scheme)" in ready
    daemon.request_stop()
    assert await asyncio.wait_for(runner, 10) == 0


async def make(tmp_path: Path, changes: list) -> Component:
    ctx = Context(config=Config(), bus=Bus(), state_dir=tmp_path, log=logging.getLogger("velod"),
                  on_state_change=lambda c, old, new: changes.append((old, new, c.error)))
    component = Healthy(ctx)
    component.state = "running"
    await asyncio.sleep(0)  # reported at the end of the loop turn
    return component


async def test_a_state_change_is_logged_after_the_error_that_explains_it(tmp_path, caplog):
    changes: list = []
    component = await make(tmp_path, changes)
    caplog.set_level(logging.DEBUG, "velod")
    component.state, component.error = "degraded", "Ollama unreachable: refused"
    await asyncio.sleep(0)
    component.state, component.error = "degraded", "Ollama unreachable: timeout"
    await asyncio.sleep(0)
    component.state, component.error = "running", None
    await asyncio.sleep(0)
    records = [(r.levelname, r.getMessage()) for r in caplog.records
               if r.name == "velod.healthy"]
    assert records == [("WARNING", "degraded: Ollama unreachable: refused"),
                       ("INFO", "recovered: running again (was degraded)")]
    assert changes == [("created", "running", None),
                       ("running", "degraded", "Ollama unreachable: refused"),
                       ("degraded", "running", None)]


async def test_a_state_that_flips_back_within_one_statement_is_not_reported(tmp_path):
    changes: list = []
    component = await make(tmp_path, changes)
    component.state = "degraded"
    component.state = "running"
    await asyncio.sleep(0)
    assert changes == [("created", "running", None)]


@pytest.mark.parametrize("new", ["stopping", "stopped"])
async def test_stopping_after_trouble_is_not_called_a_recovery(tmp_path, caplog, new):
    component = await make(tmp_path, [])
    component.state, component.error = "failed", "boom"
    await asyncio.sleep(0)
    caplog.set_level(logging.DEBUG, "velod")
    component.state = new
    await asyncio.sleep(0)
    assert not any("recovered" in r.getMessage() for r in caplog.records)
