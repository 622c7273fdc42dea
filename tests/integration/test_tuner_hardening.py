"""Issue #12, items 11-13, against the real velod: a crash between writing the drop-in and
restarting Ollama is settled at the next start by what Ollama runs; a damaged history is
skipped and reported, never a reason not to start; a new Ollama address starts without the
old one's back-off; a missing systemctl says so and changes nothing.

The world is the one of ``test_tuner_e2e``: fake GPUs, a systemd directory in tmp, the fake
systemctl first on PATH, and a fake Ollama that the fake systemctl runs with the drop-ins'
environment (so ``/proc/<pid>/environ`` is the real thing).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import wait_for
from tests.integration.test_tuner_e2e import (
    SPILLING,
    UNIT,
    Machine,
    decisions,
    fake_machine,
    start_ollama,
)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    """test_tuner_e2e's world: Ollama's settings spill llama3.1:8b, used after each start."""
    m = fake_machine(tmp_path, SPILLING, {"FAKE_OLLAMA_PRELOAD": "llama3.1:8b"})
    yield m
    m.systemctl("stop", UNIT)


def history(d: Any) -> list[dict[str, Any]]:
    return d.call("tuner.history", {"limit": 200})["entries"]


def tuner_status(d: Any) -> dict[str, Any]:
    return d.call("system.status")["components"]["tuner"]


def hang_then_kill(m: Machine, d: Any, verb: str, when: str) -> None:
    """Make velod's next ``systemctl VERB`` hang at WHEN, wait until it does, and kill
    velod there (SIGKILL: no chance to clean up), then end the hanging systemctl."""
    state = Path(m.env["FAKE_SYSTEMCTL_STATE"])
    pid_file = state / "hanging.pid"
    pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=30,
                       what=f"velod's systemctl {verb} to hang {when}"))
    d.stop(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    pid_file.unlink()


def hang_next(m: Machine, verb: str, when: str) -> None:
    (Path(m.env["FAKE_SYSTEMCTL_STATE"]) / "hang").write_text(f"{verb} {when}")


# --------------------------------------------------------------------------- item 11


@pytest.mark.parametrize(("verb", "when"), [("daemon-reload", "before"),
                                            ("restart", "before")])
def test_an_apply_velod_died_in_before_ollama_restarted_is_undone_at_the_next_start(
        machine: Machine, velod_factory: Any, verb: str, when: str) -> None:
    start_ollama(machine)
    ollama_pid = machine.ollama("/_fake/state")["pid"]
    hang_next(machine, verb, when)
    d = velod_factory(machine.velod_config("apply", settle="0s"), env=machine.env)
    hang_then_kill(machine, d, verb, when)
    assert machine.velod_dropin.exists(), "velod died after writing its drop-in"
    assert machine.ollama("/_fake/state")["pid"] == ollama_pid, "and before the restart"
    calls = len(machine.calls())

    # The next start, in observe mode: the drop-in goes back to what Ollama runs, and velod
    # does not claim Ollama runs the plan.
    d2 = velod_factory(machine.velod_config("observe"), env=machine.env)
    wait_for(lambda: "rolled-back" in decisions(d2), what="the interrupted apply undone")
    entries = history(d2)
    undone = next(e for e in entries if e["decision"] == "rolled-back")
    assert entries[entries.index(undone) - 1]["decision"] == "applying"
    assert undone["interrupted"] and "before Ollama restarted" in undone["message"]
    assert undone["running"] == "process"
    assert not machine.velod_dropin.exists()  # there was none before
    assert machine.calls()[calls:] == [["daemon-reload"]]  # and no restart
    assert machine.ollama("/_fake/state")["pid"] == ollama_pid
    status = wait_for(lambda: (t := tuner_status(d2))["changes"] and t, what="a plan")
    assert "runs the recommended settings" not in status["summary"]
    assert "change(s) recommended" in status["summary"]
    assert not d2.call("tuner.show")["up_to_date"]
    assert "before Ollama restarted" in d2.ctl("tune", "history").stdout

    # And in apply mode the change is made again, properly this time.
    d2.stop()
    restarts = machine.restarts()
    d3 = velod_factory(machine.velod_config("apply", settle="0s"), env=machine.env)
    wait_for(lambda: "verified" in decisions(d3), timeout=30, what="a verified apply")
    assert machine.restarts() == restarts + 1
    assert "runs the recommended settings" in tuner_status(d3)["summary"]


def test_an_apply_velod_died_in_after_ollama_restarted_is_finished_without_a_restart(
        machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    hang_next(machine, "restart", "after")
    d = velod_factory(machine.velod_config("apply", settle="0s"), env=machine.env)
    hang_then_kill(machine, d, "restart", "after")
    assert machine.restarts() == 1
    assert "applied" not in decisions_in_file(machine)

    d2 = velod_factory(machine.velod_config("apply", settle="0s", min_restart_interval="0s"),
                       env=machine.env)
    wait_for(lambda: "verified" in decisions(d2), timeout=30, what="the apply finished")
    finished = next(e for e in history(d2) if e["decision"] == "applied")
    assert finished["interrupted"] and "after Ollama restarted" in finished["message"]
    assert machine.restarts() == 1  # Ollama already ran the new settings
    assert "runs the recommended settings" in tuner_status(d2)["summary"]
    (loaded,) = machine.ollama("/api/ps")["models"]
    assert loaded["size_vram"] == loaded["size"]


def decisions_in_file(m: Machine) -> list[str]:
    path = m.tmp / "velod-state" / "tuner-history.jsonl"
    return [json.loads(line)["decision"] for line in path.read_text().splitlines()]


def test_a_drop_in_ollama_was_not_restarted_for_is_not_called_running(
        machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    d = velod_factory(machine.velod_config("observe"), env=machine.env)
    planned = wait_for(lambda: (s := d.call("tuner.show"))["changes"] and s["plan"]["server"],
                       what="a plan")
    # Someone writes exactly the plan into velod's drop-in and reloads systemd, but does
    # not restart Ollama: the files (and systemd's view) say the plan, the process does not.
    machine.velod_dropin.write_text(
        "# Managed by velod for ollama.service (written by hand in this test)\n[Service]\n"
        + "".join(f'Environment="{name}={rec["value"]}"\n'
                  for name, rec in sorted(planned.items())))
    assert machine.systemctl("daemon-reload").returncode == 0
    show = wait_for(lambda: (s := d.call("tuner.show"))["running"]["not_running"] and s,
                    what="velod to see that Ollama does not run its drop-in")
    assert not show["up_to_date"]
    assert "was not restarted" in d.ctl("tune", "show").stdout
    assert "not running yet" in tuner_status(d)["summary"]


# --------------------------------------------------------------------------- item 12


DAMAGED_HISTORY = b"\n".join([
    b'{"time": 1700000000.0, "decision": "planned", "message": "ok"}',
    b'{"decision": "applied", "restarted": true}',  # no time: once a KeyError at start
    b'{"time": "soon", "decision": "applied", "restarted": true}',
    b'{"time": 1700000001.0, "decision": "applied", "target": "variant"}',  # no variant
    b'{"time": 1700000002.0, "decision": "rolled-back", "failed": ["not", "a", "map"]}',
    b'{"time": 1700000003.0, "decision": "explore-kept", "base": {"A": 1}, "pins": 3}',
    b"\x00\xff garbage",
    b"[" * 50_000,
    b'{"time": 1700000004.0, "decision": "planned", "message": "still read"}',
]) + b"\n"


def test_a_damaged_history_is_skipped_and_reported_and_velod_starts(
        machine: Machine, velod_factory: Any, tmp_path: Path) -> None:
    start_ollama(machine)
    config = machine.velod_config("apply", settle="0s")
    state = Path(config["state_dir"])
    state.mkdir(parents=True)
    (state / "tuner-history.jsonl").write_bytes(DAMAGED_HISTORY)
    bench = state / "bench"
    bench.mkdir()
    (bench / "20260101-000000-00000.json").write_text('{"id": "x", "cases": "many"}')
    d = velod_factory(config, env=machine.env)
    # It starts, tunes as usual, and says what it skipped.
    wait_for(lambda: "applied" in decisions(d), timeout=30, what="an apply")
    tuner = tuner_status(d)
    assert tuner["state"] == "running", tuner
    # 4 lines are not entries; 3 more are entries with fields of the wrong type, kept for
    # the record and ignored by the readers that need those fields.
    assert "4 damaged line(s) skipped" in tuner["summary"]
    assert "damaged line(s)" in tuner["history"]["warning"]
    assert "damaged line(s)" in d.log_text()
    out = d.ctl("tune", "history", "--limit", "100").stdout
    assert "still read" in out and "warning: 4 damaged line(s)" in out
    listing = d.ctl("bench", "list")
    assert listing.returncode == 0 and "damaged file skipped" in listing.stdout
    shown = d.ctl("bench", "show", "20260101-000000-00000", check=False)
    assert shown.returncode == 1 and "is damaged" in shown.stderr
    assert "[internal]" not in shown.stderr
    assert d.alive()


# --------------------------------------------------------------------------- item 13


def test_a_new_ollama_address_starts_without_the_old_ones_back_off(velod_factory: Any) -> None:
    d = velod_factory({"tuner": {"interval": "200ms"}})  # http://127.0.0.1:9: nothing there
    wait_for(lambda: tuner_status(d)["ollama"]["failures"] >= 4, timeout=20,
             what="a long back-off")
    assert tuner_status(d)["ollama"]["retry_in"] > 1.0
    config = yaml.safe_load(d.config_path.read_text())
    config["ollama"]["url"] = "http://127.0.0.1:7"  # another address, down as well
    d.write_config(config)
    assert d.ctl("reload").returncode == 0
    ollama = wait_for(lambda: (o := tuner_status(d)["ollama"])["url"].endswith(":7")
                      and o["failures"] >= 1 and o, what="the new address polled")
    assert ollama["failures"] <= 2, ollama  # counted afresh, not 5, 6, ...
    assert ollama["retry_in"] is not None and ollama["retry_in"] <= 0.9


def test_a_missing_systemctl_says_so_and_changes_nothing(
        machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    config = machine.velod_config("apply", settle="0s")
    config["ollama"]["systemctl"] = str(machine.tmp / "no-such-dir" / "systemctl")
    d = velod_factory(config, env=machine.env)
    wait_for(lambda: "error" in decisions(d), timeout=20, what="the apply to fail")
    error = next(e for e in history(d) if e["decision"] == "error")
    assert "systemctl not found" in error["message"], error
    assert "did not come back" not in error["message"]
    assert not machine.velod_dropin.exists() and machine.restarts() == 0
    out = d.ctl("tune", "apply", "--now", check=False)
    assert out.returncode == 1 and "systemctl not found" in out.stdout + out.stderr
    assert not machine.velod_dropin.exists()
