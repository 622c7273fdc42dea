"""The fake systemctl follows systemd where the tuner's tests rely on it: ExecStart= lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "bin" / "systemctl"
UNIT = "sleeper.service"
SLEEP = f"{sys.executable} -c 'import time; time.sleep(60)'"


@pytest.fixture
def systemctl(tmp_path: Path) -> Iterator[tuple[Path, object]]:
    env = {**os.environ, "FAKE_SYSTEMCTL_STATE": str(tmp_path / "state"),
           "FAKE_SYSTEMCTL_SYSTEMD_DIR": str(tmp_path / "systemd")}
    (tmp_path / "state").mkdir()
    (tmp_path / "systemd" / f"{UNIT}.d").mkdir(parents=True)
    (tmp_path / "state" / f"{UNIT}.json").write_text(json.dumps({"argv": ["false"],
                                                                  "env": {}}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(FAKE), *args], env=env, capture_output=True, text=True,
                              timeout=30)

    yield tmp_path / "systemd", run
    run("stop", UNIT)


def cmdline(pid: str) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def test_start_runs_the_units_execstart_and_show_describes_it(systemctl: tuple) -> None:
    systemd, run = systemctl
    (systemd / UNIT).write_text(f"[Service]\nExecStart=-{SLEEP}\nEnvironment=A=1\n")
    assert run("start", UNIT).returncode == 0
    pid = run("show", "-p", "MainPID", "--value", UNIT).stdout.strip()
    assert cmdline(pid)[1:] == ["-c", "import time; time.sleep(60)"]  # '-' prefix dropped
    shown = run("show", "-p", "ExecStart", "--value", UNIT).stdout
    assert shown.startswith(f"{{ path={sys.executable} ; argv[]={sys.executable} -c ")


def test_a_drop_in_resets_execstart_and_is_seen_after_daemon_reload(systemctl: tuple) -> None:
    systemd, run = systemctl
    (systemd / UNIT).write_text(f"[Service]\nExecStart={SLEEP}\n")
    run("start", UNIT)
    (systemd / f"{UNIT}.d" / "50-x.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={SLEEP} --again\n")
    run("restart", UNIT)  # no daemon-reload yet: the old command line
    pid = run("show", "-p", "MainPID", "--value", UNIT).stdout.strip()
    assert "--again" not in cmdline(pid)
    run("daemon-reload")
    run("restart", UNIT)
    pid = run("show", "-p", "MainPID", "--value", UNIT).stdout.strip()
    assert cmdline(pid)[-1] == "--again"


def test_two_execstart_lines_of_a_simple_service_are_refused(systemctl: tuple) -> None:
    systemd, run = systemctl
    (systemd / UNIT).write_text(f"[Service]\nExecStart={SLEEP}\n")
    (systemd / f"{UNIT}.d" / "50-x.conf").write_text(f"[Service]\nExecStart={SLEEP}\n")
    result = run("start", UNIT)
    assert result.returncode == 1 and "more than one ExecStart=" in result.stderr
    assert run("is-active", UNIT).returncode == 3
