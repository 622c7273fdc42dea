"""What Ollama's service runs: systemctl show's properties and /proc/PID/environ, read."""

from __future__ import annotations

import os

import pytest

from tests.fakes.fake_systemctl import shell_maybe_quote
from velod.tuner.recovery import interrupted, runs
from velod.tuner.running import Running, from_reports, parse_environ, parse_show, split_strv


@pytest.mark.parametrize("entries", [
    ["A=b"], ["A=b c", "B="], ['A=$x"y\\z`'], ["A=tab\there", "B=nl\nx\x01"],
    ["A='single'", "B=%%", "C=ünï"], []])
def test_environment_entries_survive_systemds_quoting(entries: list[str]) -> None:
    assert split_strv(" ".join(shell_maybe_quote(e) for e in entries)) == entries


def test_systemd_quoted_output_reads_as_systemd_printed_it() -> None:
    # As systemd 252 prints a unit with Environment="OLLAMA_HOST=0.0.0.0" "X=a b".
    props = parse_show('MainPID=0\nActiveState=inactive\n'
                       'Environment=OLLAMA_HOST=0.0.0.0 "X=a b" "Y=\\$HOME"\n')
    assert props["MainPID"] == "0"
    assert split_strv(props["Environment"]) == ["OLLAMA_HOST=0.0.0.0", "X=a b", "Y=$HOME"]
    with pytest.raises(ValueError, match="unterminated"):
        split_strv('"A=b')


def test_the_process_environment_wins_over_systemds_view() -> None:
    props = {"MainPID": "42", "ActiveState": "active", "NeedDaemonReload": "no",
             "Environment": "OLLAMA_NUM_PARALLEL=4", "ExecMainStartTimestampMonotonic": "5000000"}
    running = from_reports(props, b"OLLAMA_NUM_PARALLEL=1\0PATH=/bin\0")
    assert running.source == "process" and running.pid == 42 and running.started == 5.0
    assert running.runs({"OLLAMA_NUM_PARALLEL": "1"})
    assert running.differences({"OLLAMA_NUM_PARALLEL": "4"}) == {
        "OLLAMA_NUM_PARALLEL": ("1", "4")}


def test_without_the_process_environment_systemds_view_is_used_and_says_so() -> None:
    props = {"MainPID": "42", "ActiveState": "active", "NeedDaemonReload": "yes",
             "Environment": "OLLAMA_NUM_PARALLEL=4"}
    running = from_reports(props, None, "Permission denied")
    assert running.source == "systemd" and running.runs({"OLLAMA_NUM_PARALLEL": "4"})
    assert "Permission denied" in running.note and "changed since" in running.note


def test_a_stopped_service_runs_nothing_known() -> None:
    running = from_reports({"MainPID": "0", "ActiveState": "inactive"}, None)
    assert running.active is False and running.environment is None
    assert running.runs({"A": "1"}) is None and running.differences({"A": "1"}) == {}
    assert "inactive" in running.note


def test_the_process_environment_of_a_real_process_reads_back() -> None:
    with open(f"/proc/{os.getpid()}/environ", "rb") as f:
        env = parse_environ(f.read())
    assert env.get("PATH") == os.environ.get("PATH")


def test_systemds_view_after_a_daemon_reload_does_not_count_for_an_older_process() -> None:
    from velod.tuner.applier import boot_id

    entry = {"decision": "applying", "time": 1.0, "monotonic": 100.0, "boot_id": boot_id()}
    wanted = {"OLLAMA_NUM_PARALLEL": "2"}
    older = Running(True, 7, dict(wanted), "systemd", started=50.0)
    newer = Running(True, 7, dict(wanted), "systemd", started=150.0)
    exact = Running(True, 7, dict(wanted), "process", started=50.0)
    assert runs(older, entry, wanted) is False  # reloaded, never restarted
    assert runs(newer, entry, wanted) is True
    assert runs(exact, entry, wanted) is True  # the process's own environment is the truth
    other_boot = {**entry, "boot_id": "another-boot"}
    assert runs(older, other_boot, wanted) is True  # started at boot from the files


def test_an_applying_entry_without_an_outcome_after_it_is_interrupted() -> None:
    def e(decision: str, **extra: object) -> dict[str, object]:
        return {"time": 1.0, "decision": decision, **extra}

    applying = e("applying", action="apply")
    assert interrupted([e("planned"), applying]) is applying
    assert interrupted([applying, e("planned"), e("skipped-busy")]) is applying
    assert interrupted([applying, e("applied", target="variant")]) is applying
    assert interrupted([applying, e("applied")]) is None
    assert interrupted([applying, e("error")]) is None
    assert interrupted([e("rolled-back")]) is None and interrupted([]) is None
