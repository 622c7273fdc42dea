"""The real daemon and the real velodctl: status, ping, hello, exit codes, shutdown."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import velod_command, velodctl_command, watch_a_reload
from velod import __version__


def test_status_ping_and_hello(velod):
    status = json.loads(velod.ctl("status", "--json").stdout)
    assert status["version"] == __version__
    assert status["pid"] == velod.proc.pid
    assert status["config_path"] == str(velod.config_path)
    assert status["last_reload"]["ok"] is True
    assert status["uptime"] >= 0
    assert isinstance(status["components"], dict)

    human = velod.ctl("status").stdout
    assert f"pid {velod.proc.pid}" in human and str(velod.config_path) in human

    assert "velod answered in" in velod.ctl("ping").stdout
    hello = velod.call("system.hello")
    assert hello["name"] == "velod" and hello["protocol"] == 1
    assert {"system.ping", "system.status", "config.reload", "events.subscribe"} <= set(
        hello["methods"])


def test_global_options_work_before_and_after_the_command(velod):
    cmd = [*velodctl_command(), "--json", "--socket", str(velod.socket), "ping"]
    assert json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)["ok"]


def test_config_show_returns_the_running_config(velod):
    shown = json.loads(velod.ctl("config", "show", "--json").stdout)
    assert shown["path"] == str(velod.config_path)
    assert shown["config"]["state_dir"] == str(velod.state_dir)
    assert "state_dir:" in velod.ctl("config", "show").stdout


def test_unreachable_daemon_exits_3_and_says_what_to_do(tmp_path):
    result = subprocess.run([*velodctl_command(), "--socket", str(tmp_path / "none.sock"),
                             "status"], capture_output=True, text=True)
    assert result.returncode == 3
    assert "velod is not running: no socket at" in result.stderr
    assert "velod.service" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    result = subprocess.run([*velodctl_command(), "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2


def test_remote_errors_exit_1(velod, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuner:\n  mode: aply\n")
    result = velod.ctl("config", "validate", str(bad), check=False)
    assert result.returncode == 1
    assert "tuner.mode" in result.stderr and "did you mean 'apply'" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("tuner:\n  mode: apply\n")
    assert velod.ctl("config", "validate", str(good)).stdout.strip().endswith("valid")


def test_config_validate_works_without_a_daemon(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {block_size: 12}\n")
    result = subprocess.run([*velodctl_command(), "--socket", str(tmp_path / "x.sock"),
                             "config", "validate", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "engine.block_size" in result.stderr


def test_check_config_exit_codes(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("log: {level: debug}\n")
    bad.write_text("log: {level: loud}\nhardware: {interval: 1}\nnope: 1\n")
    ok = subprocess.run([*velod_command(), "--check-config", str(good)], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    ko = subprocess.run([*velod_command(), "--check-config", str(bad)], capture_output=True,
                        text=True)
    assert ko.returncode == 1
    assert "log.level" in ko.stderr and "nope: unknown key" in ko.stderr
    missing = subprocess.run([*velod_command(), "--check-config", str(tmp_path / "no.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_version_flags():
    out = subprocess.run([*velod_command(), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"velod {__version__}"
    out = subprocess.run([*velodctl_command(), "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"velodctl {__version__}"


def test_python_dash_m_velod_runs_the_daemon(velod_factory):
    import sys
    d = velod_factory(args=[])
    assert d.alive()
    out = subprocess.run([sys.executable, "-m", "velod", "--version"], capture_output=True,
                         text=True)
    assert out.stdout.startswith("velod ")


def test_a_broken_config_at_start_exits_78(velod_factory):
    d = velod_factory("engine: {block_size: 12}\n", wait=False)
    assert d.proc.wait(20) == 78
    assert "engine.block_size" in d.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_gracefully_and_remove_the_socket(velod_factory, sig):
    d = velod_factory()
    start = time.monotonic()
    d.proc.send_signal(sig)
    assert d.proc.wait(10) == 0
    assert time.monotonic() - start < 5
    assert not d.socket.exists()


def test_system_shutdown_stops_the_daemon(velod):
    assert velod.call("system.shutdown") == {"stopping": True}
    assert velod.proc.wait(10) == 0
    assert not velod.socket.exists()


def test_stale_socket_from_a_crash_is_replaced(velod_factory, tmp_path):
    sock_path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nothing listens: what a crash leaves behind
    d = velod_factory(socket=sock_path)
    assert d.call("system.ping")["pong"] is True


def test_a_live_daemon_is_not_replaced(velod, velod_factory):
    second = velod_factory(socket=velod.socket, wait=False)
    assert second.proc.wait(20) == 1
    assert "already answering" in second.log_text()
    assert velod.call("system.ping")["pong"]


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_socket_path_that_is_not_a_socket_is_refused(velod_factory, tmp_path, kind):
    path = tmp_path / "odd.sock"
    if kind == "symlink":
        os.symlink(tmp_path / "elsewhere", path)
    else:
        path.write_text("precious data")
    d = velod_factory(socket=path, wait=False)
    assert d.proc.wait(20) == 1
    assert ("symbolic link" if kind == "symlink" else "not a socket") in d.log_text()
    if kind == "file":
        assert path.read_text() == "precious data"


def test_the_socket_is_world_connectable(velod):
    assert velod.socket.stat().st_mode & 0o777 == 0o666


def test_events_stream_until_the_client_leaves(velod):
    client = velod.client(timeout=10)
    events = client.subscribe(["config.*"])
    velod.call("config.reload")
    event = next(events)
    assert event["topic"] == "config.reloaded"
    assert event["data"]["trigger"] == "control request"
    client.close()
    time.sleep(0.2)
    assert velod.call("system.ping")["pong"]


def test_velodctl_watch_prints_events(velod):
    watch_a_reload(velod, "config.*")


def test_an_idle_daemon_loads_neither_numpy_nor_pycuda(velod):
    velod.call("system.status")
    velod.call("engine.status")
    maps = Path(f"/proc/{velod.proc.pid}/maps").read_text()
    assert "numpy" not in maps and "pycuda" not in maps
