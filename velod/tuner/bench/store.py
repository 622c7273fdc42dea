"""Saved benchmark results: one JSON file per run in ``<state_dir>/bench/``.

Blocking file I/O (call through ``run_blocking``). IDs are ``YYYYmmdd-HHMMSS-mmmxx`` (UTC
time, milliseconds and two random hex digits), so they sort by time and never name a
path outside the directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"^\d{8}-\d{6}-\d{3}[0-9a-f]{2}$")


class BenchNotFound(LookupError):
    """No saved result has this ID (or the prefix is ambiguous)."""


def new_id(now: float | None = None) -> str:
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}{secrets.token_hex(1)}"


class BenchStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.directory = Path(state_dir) / "bench"

    def path(self, run_id: str) -> Path:
        if not ID_PATTERN.match(run_id):
            raise BenchNotFound(f"{run_id!r} is not a benchmark ID (like 20261127-001500-123ab)")
        return self.directory / f"{run_id}.json"

    def save(self, result: dict[str, Any]) -> Path:
        """Write ``result`` (which holds its ``id``) atomically; returns the path."""
        path = self.path(result["id"])
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def ids(self) -> list[str]:
        """Saved IDs, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if ID_PATTERN.match(p.stem))

    def resolve(self, ref: str) -> str:
        """An ID from an exact ID, a unique prefix of one, or ``last``/``last~N``."""
        ids = self.ids()
        if ref == "last" or ref.startswith("last~"):
            back = int(ref[5:]) if ref[5:].isdigit() else 0
            if back >= len(ids):
                raise BenchNotFound(f"there are only {len(ids)} saved benchmark(s)")
            return ids[-1 - back]
        matches = [i for i in ids if i.startswith(ref)] if ref else []
        if ref in ids:
            return ref
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise BenchNotFound(f"{ref!r} matches {len(matches)} benchmarks: "
                                + ", ".join(matches[:5]))
        raise BenchNotFound(f"no saved benchmark {ref!r} (see velodctl bench list)")

    def load(self, ref: str) -> dict[str, Any]:
        run_id = self.resolve(ref)
        try:
            data = json.loads(self.path(run_id).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BenchNotFound(f"cannot read benchmark {run_id}: {exc}") from None
        if not isinstance(data, dict):
            raise BenchNotFound(f"benchmark file {run_id} does not hold a result")
        return data

    def summaries(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` results in brief, newest first; unreadable files skipped."""
        out = []
        for run_id in reversed(self.ids()):
            if len(out) >= limit:
                break
            try:
                out.append(summary(self.load(run_id)))
            except BenchNotFound:
                continue
        return out


def server_of(result: dict[str, Any]) -> dict[str, Any]:
    """The server a result measured (results before llama-server support name Ollama's)."""
    server = result.get("server")
    if isinstance(server, dict):
        return server
    ollama = result.get("ollama")
    return {"name": "ollama", "kind": "ollama", **(ollama if isinstance(ollama, dict) else {})}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """One line's worth of a result: id, time, server, model, purpose, status, headline
    speed."""
    cases = result.get("cases", [])
    first = cases[0]["metrics"].get("gen_tps") if cases else None
    return {"id": result.get("id"), "time": result.get("time"),
            "server": server_of(result).get("name"),
            "model": result.get("spec", {}).get("model"),
            "purpose": result.get("spec", {}).get("purpose"),
            "complete": result.get("complete"), "error": result.get("error"),
            "cases": len(cases), "gen_tps": first["median"] if first else None,
            "settings": result.get("server_settings", {})}
