"""The tuner history: append-only JSON lines that survive restarts and torn writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from velod.tuner.history import History


def test_entries_come_back_oldest_first_with_their_details(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append("planned", changes={"OLLAMA_NUM_PARALLEL": [None, "2"]})
    history.append("applied", restart=True)
    entries = history.last(10)
    assert [e["decision"] for e in entries] == ["planned", "applied"]
    assert entries[0]["changes"] == {"OLLAMA_NUM_PARALLEL": [None, "2"]}
    assert entries[1]["time"] >= entries[0]["time"]


def test_history_survives_a_new_instance(tmp_path: Path) -> None:
    History(tmp_path).append("verified")
    assert History(tmp_path).latest("verified") is not None


def test_unknown_decisions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown decision"):
        History(tmp_path).append("maybe")


def test_last_is_bounded_and_reads_across_chunks(tmp_path: Path) -> None:
    history = History(tmp_path)
    for i in range(3000):
        history.append("planned", i=i, pad="x" * 40)
    entries = history.last(5)
    assert [e["i"] for e in entries] == [2995, 2996, 2997, 2998, 2999]
    assert len(history.last(2500)) == 2500
    assert history.last(0) == []


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_clean(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append("planned", n=1)
    with open(history.path, "a") as f:
        f.write('{"time": 1, "decision": "appl')  # a crash in mid-write
    assert [e["n"] for e in history.last(10)] == [1]
    history.append("applied", n=2)
    assert [e.get("n") for e in history.last(10)] == [1, 2]
    lines = history.path.read_text().splitlines()
    assert json.loads(lines[-1])["n"] == 2


def test_latest_finds_the_newest_of_several_kinds(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append("applied", n=1)
    history.append("rolled-back", n=2)
    history.append("planned", n=3)
    assert history.latest("applied", "rolled-back")["n"] == 2  # type: ignore[index]
    assert history.latest("error") is None


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert History(tmp_path / "nowhere").last(5) == []


DAMAGED = [
    b"not json at all",
    b'["a", "list"]',
    b'{"decision": "applied", "restarted": true}',  # no time: once a KeyError at start
    b'{"time": "yesterday", "decision": "applied"}',
    b'{"time": 1e999, "decision": "applied"}',  # inf
    b'{"time": 5, "decision": 7}',
    b'{"time": 5, "decision": "exploded"}',
    b"\xff\xfe binary \x00 junk",
    b"[" * 100_000,  # nested past the JSON parser's recursion limit
]


def test_damaged_lines_are_skipped_and_counted_and_good_ones_kept(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append("planned", n=1)
    with open(history.path, "ab") as f:
        f.write(b"\n".join(DAMAGED) + b"\n")
    history.append("applied", n=2, restarted=True)
    entries = history.last(100)
    assert [e["n"] for e in entries] == [1, 2]
    assert all(isinstance(e["time"], float) for e in entries)
    assert history.skipped.count == len(DAMAGED)
    assert "not JSON" in history.skipped.example
    assert f"{len(DAMAGED)} damaged line(s) in {history.path}" in \
        history.skipped.describe(history.path)
    history.path.write_text('{"time": 1, "decision": "planned"}\n')
    history.last(10)
    assert history.skipped.count == 0  # as of the last read
