"""sd_notify as systemd sees it: a datagram socket receives READY, RELOADING (with
MONOTONIC_USEC), READY again, WATCHDOG and STOPPING, in that order."""

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, REPO


class NotifyListener:
    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.sock.settimeout(10)
        self.address = address

    def next(self, status_updates: bool = False) -> dict[str, str]:
        """The next datagram; one that only updates STATUS= is skipped unless asked for."""
        while True:
            data = self.sock.recv(4096).decode()
            msg = dict(line.split("=", 1) for line in data.splitlines())
            if status_updates or set(msg) != {"STATUS"}:
                return msg

    def until(self, key: str, timeout: float = 10) -> list[dict[str, str]]:
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.next()
            seen.append(msg)
            if key in msg:
                return seen
        raise AssertionError(f"no {key} within {timeout}s: {seen}")


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    address = (str(tmp_path / "notify.sock") if request.param == "path"
               else f"@velod-test-{uuid.uuid4().hex}")
    lst = NotifyListener(address)
    yield lst
    lst.sock.close()


def test_notify_sequence_ready_reloading_ready_stopping(velod_factory, listener):
    d = velod_factory(env={"NOTIFY_SOCKET": listener.address})
    first = listener.next()
    assert first["READY"] == "1"
    assert first["MAINPID"] == str(d.proc.pid)
    assert "serving on" in first["STATUS"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.proc.send_signal(signal.SIGHUP)
    reloading = listener.next()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert listener.next()["READY"] == "1"

    d.proc.send_signal(signal.SIGTERM)
    assert "STOPPING" in listener.until("STOPPING")[-1]
    assert d.proc.wait(10) == 0


def test_velodctl_reload_is_wrapped_in_reloading_and_ready(velod_factory, listener):
    d = velod_factory(env={"NOTIFY_SOCKET": listener.address})
    listener.next()  # READY
    d.ctl("reload")
    assert listener.next()["RELOADING"] == "1"
    assert listener.next()["READY"] == "1"


def test_watchdog_pings_come_from_the_serving_loop(velod_factory, listener):
    velod_factory(env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
    pings = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and pings < 4:
        if listener.next().get("WATCHDOG") == "1":
            pings += 1
    assert pings >= 4


def test_no_watchdog_for_another_pid(velod_factory, tmp_path):
    lst = NotifyListener(str(tmp_path / "n.sock"))
    velod_factory(env={"NOTIFY_SOCKET": lst.address, "WATCHDOG_USEC": "100000",
                       "WATCHDOG_PID": "1"})
    assert "READY" in lst.next()
    lst.sock.settimeout(0.6)
    with pytest.raises(TimeoutError):
        while True:
            assert "WATCHDOG" not in lst.next()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    unit = (REPO / "packaging/systemd/velod.service").read_text()
    # verify checks that ExecStart= programs exist: point them at this checkout's install
    unit = unit.replace("/usr/bin/velodctl", str(BIN / "velodctl")).replace(
        "/usr/bin/velod ", f"{BIN / 'velod'} ")
    path = tmp_path / "velod.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert result.returncode == 0, result.stderr
    assert "velod.service" not in result.stderr, result.stderr


def test_unit_has_the_settings_the_design_requires():
    unit = (REPO / "packaging/systemd/velod.service").read_text()
    for line in ["Type=notify", "ExecReload=/usr/bin/velodctl --socket /run/velod/velod.sock "
                 "reload", "WatchdogSec=", "RuntimeDirectory=velod", "StateDirectory=velod",
                 "ConfigurationDirectory=velod", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "DeviceAllow=/dev/nvidiactl rw", "RestartPreventExitStatus=78"]:
        assert line in unit
    assert "PrivateDevices=yes" not in unit  # it would hide /dev/nvidia*
    assert "g velod" in Path(REPO / "packaging/systemd/velod.sysusers.conf").read_text()
