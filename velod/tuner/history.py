"""The tuner's append-only decision history: one JSON object per line in the state dir.

A line is ``{"time": unix seconds, "decision": kind, ...details}``. Appends are single
``write`` calls of one line to a file opened with O_APPEND, so a crash leaves at most one
torn last line, which reading skips. Reading the last N lines reads only the file's tail.

The file is input like any other: a line that is not such an object (torn, edited by hand,
disk damage) is skipped and counted in ``skipped`` for the tuner's status, never raised.
Every entry ``last`` returns has a finite number ``time`` and a known ``decision``; readers
check the type of any other field they use.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# "applying" is written before velod touches Ollama's drop-in, so that an apply cut short by
# a crash is noticed at the next start (velod.tuner.recovery).
DECISIONS = ("planned", "applying", "applied", "skipped-busy", "skipped-rate-limited", "verified",
             "rolled-back", "error", "explore-trial", "explore-kept", "explore-aborted")
FILE_NAME = "tuner-history.jsonl"
_TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Skipped:
    """Damaged lines the last read passed over: how many, and what the first one was."""

    count: int = 0
    example: str = ""

    def describe(self, path: Path) -> str:
        return (f"{self.count} damaged line(s) in {path} skipped (first: {self.example}); "
                "the rest of the history is used")


class History:
    """The history file; blocking I/O (small writes; call through run_blocking if in doubt)."""

    def __init__(self, state_dir: str | Path, name: str = FILE_NAME) -> None:
        self.path = Path(state_dir) / name
        self.skipped = Skipped()  # as of the last read

    def append(self, decision: str, **details: Any) -> dict[str, Any]:
        """Record one decision; returns the entry written."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r} (one of {', '.join(DECISIONS)})")
        entry = {"time": round(time.time(), 3), "decision": decision, **details}
        line = json.dumps(entry, sort_keys=False, default=str, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if self._ends_torn(fd):
                line = "\n" + line  # never glue a new entry onto a torn one
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return entry

    @staticmethod
    def _ends_torn(fd: int) -> bool:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"

    def last(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first; unparseable lines are skipped."""
        if limit <= 0:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                data, start = b"", end
                while start > 0 and data.count(b"\n") <= limit:
                    start = max(0, start - _TAIL_CHUNK)
                    f.seek(start)
                    data = f.read(end - start)
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first line may be cut in the middle
        entries, bad, example = [], 0, ""
        for raw in lines:
            if not raw.strip():
                continue
            entry, problem = parse_line(raw)
            if entry is not None:
                entries.append(entry)
            else:
                bad += 1
                example = example or problem
        self.skipped = Skipped(bad, example)
        return entries[-limit:]

    def latest(self, *decisions: str, scan: int = 500) -> dict[str, Any] | None:
        """The newest entry of one of ``decisions`` among the last ``scan`` entries."""
        for entry in reversed(self.last(scan)):
            if entry["decision"] in decisions:
                return entry
        return None


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(entry, "") for a valid history line, else (None, what is wrong with it)."""
    excerpt = raw[:60].decode("utf-8", "replace") + ("..." if len(raw) > 60 else "")
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, f"not JSON: {excerpt!r}"
    if not isinstance(entry, dict):
        return None, f"not an object: {excerpt!r}"
    stamp = entry.get("time")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not math.isfinite(stamp):
        return None, f"no valid 'time': {excerpt!r}"
    if entry.get("decision") not in DECISIONS:
        return None, f"no known 'decision': {excerpt!r}"
    return entry, ""


def str_map(value: Any) -> dict[str, str] | None:
    """``value`` when it is a JSON object of strings (an environment, pins), else None."""
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return value
    return None
