"""velodctl exits 0 only when velod answered success: a refused or dropped connection is exit 3
with a message (and JSON on stdout with --json), an oversized reply a clear error."""

import json
import signal
import subprocess
import time

import pytest

from tests.integration.conftest import velodctl_command, watch_a_reload
from velod.control import cli
from velod.control.client import Client


def ctl(daemon_socket, *args, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*velodctl_command(), "--socket", str(daemon_socket), *args],
                          capture_output=True, text=True, timeout=60, **kwargs)


def test_a_reload_refused_at_the_door_is_exit_3_not_success(velod_factory):
    daemon = velod_factory({"control": {"max_connections_per_uid": 2}})
    held = [daemon.client() for _ in range(2)]
    for client in held:
        assert client.call("system.ping")["pong"]
    result = daemon.ctl("reload", check=False)
    assert result.returncode == 3, result
    assert "velod dropped the connection: too many connections from uid" in result.stderr
    assert "Traceback" not in result.stderr
    as_json = daemon.ctl("reload", "--json", check=False)
    assert as_json.returncode == 3
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["exit_code"] == 3
    assert report["error"]["code"] == "busy"


def test_a_daemon_that_dies_mid_call_is_exit_3(velod_factory):
    daemon = velod_factory()
    daemon.proc.send_signal(signal.SIGSTOP)  # connect works (the backlog), no answer comes
    try:
        proc = subprocess.Popen([*velodctl_command(), "--socket", str(daemon.socket), "reload"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        daemon.proc.kill()
        out, err = proc.communicate(timeout=30)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 3, (out, err)
    assert "velod closed the connection" in err or "connection to velod failed" in err


def test_ctrl_c_while_waiting_for_an_answer_is_exit_130_not_success(velod_factory):
    daemon = velod_factory()
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        proc = subprocess.Popen([*velodctl_command(), "--socket", str(daemon.socket), "reload"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.8)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 130


def test_unreachable_with_json_prints_a_json_error_too(tmp_path):
    result = ctl(tmp_path / "none.sock", "status", "--json")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["error"]["code"] == "unreachable"
    assert "no socket at" in report["error"]["message"]
    assert "no socket at" in result.stderr


def test_a_remote_error_with_json_prints_a_json_error_too(velod):
    result = velod.ctl("engine", "status", "--json", "--bogus", check=False)
    assert result.returncode == 2  # usage errors stay usage errors
    result = ctl(velod.socket, "tune", "rollback", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["exit_code"] == 1 and report["error"]["message"]


def test_a_reply_over_the_clients_limit_is_a_clear_error(velod, monkeypatch, capsys):
    monkeypatch.setattr(Client, "max_reply_size", 1024)  # system.status is larger than this
    code = cli.main(["--socket", str(velod.socket), "status"])
    err = capsys.readouterr().err
    assert code == 1
    assert "velod's reply is larger than the 1024 bytes this client accepts" in err


def test_a_reader_that_closes_stdout_ends_velodctl_quietly_and_not_as_success(velod_factory):
    daemon = velod_factory({"hardware": {"interval": "100ms"}})
    script = (f"{' '.join(velodctl_command())} --socket {daemon.socket} watch --json "
              "'hardware.*' | head -n 1 >/dev/null; echo ${PIPESTATUS[0]}")
    piped = subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True,
                           timeout=60)
    assert piped.stdout.strip() == "141", piped  # like a program killed by SIGPIPE
    assert "Traceback" not in piped.stderr and "Exception ignored" not in piped.stderr


# ------------------------------------------------------------------------------- watch


def test_watch_says_when_no_topic_matches(velod):
    result = velod.ctl("watch", "hardwre.*", check=False, timeout=20)
    assert result.returncode == 2
    assert "no event topic matches 'hardwre.*'" in result.stderr
    assert "hardware.changed" in result.stderr  # what it could have asked for


def test_watch_warns_about_the_topic_that_matches_nothing_and_watches_the_rest(velod):
    assert "no event topic matches 'confg.*'" in watch_a_reload(velod, "config.*", "confg.*")


@pytest.mark.parametrize(("value", "text"), [(3.14159265, "3.142"), (0.000123456, "0.0001235"),
                                             (12345.678, "12346"), (7, "7"), ("x", "x")])
def test_watch_rounds_numbers(value, text):
    assert cli.rounded(value) == text


def test_watch_shows_messages_of_listed_changes():
    data = {"changes": [{"message": "GPU 0 free VRAM 10.0 -> 2.0 GiB"}, {"message": "RAM low"}]}
    assert cli.event_brief(data) == "GPU 0 free VRAM 10.0 -> 2.0 GiB; RAM low"
    assert cli.event_brief({"blocks": 512, "ms": 1.23456}) == "blocks=512 ms=1.235"
