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


class BenchDamaged(BenchNotFound):
    """A saved result that cannot be read, or does not hold a result of the right shape."""


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
        """The result ``ref`` names; BenchDamaged when its file is not a valid result."""
        run_id = self.resolve(ref)
        path = self.path(run_id)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise BenchDamaged(f"benchmark file {path} is larger than "
                                   f"{MAX_FILE_BYTES // 2**20} MiB; not reading it")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise BenchDamaged(f"cannot read benchmark {run_id}: {exc}") from None
        problem = check_result(data)
        if problem:
            raise BenchDamaged(f"benchmark file {path} is damaged: {problem}")
        return data

    def summaries(self, limit: int = 50) -> tuple[list[dict[str, Any]], list[str]]:
        """The newest ``limit`` results in brief, newest first, and the IDs of damaged files
        passed over."""
        out, damaged = [], []
        for run_id in reversed(self.ids()):
            if len(out) >= limit:
                break
            try:
                out.append(summary(self.load(run_id)))
            except BenchDamaged:
                damaged.append(run_id)
            except BenchNotFound:
                continue  # removed meanwhile
        return out, damaged


MAX_FILE_BYTES = 64 * 2**20  # a result with 50 repeats x 64 requests x 3 prompts is ~10 MiB
_NUMBER = (int, float)


def check_result(data: Any) -> str:
    """What is wrong with a loaded result ("" when nothing): the fields readers rely on.

    Saved results are files a user can edit or a disk can damage; ``summary``, ``compare``
    and the renderers may index what this checks.
    """
    if not isinstance(data, dict):
        return "it does not hold a JSON object"
    for key, kind in (("id", str), ("spec", dict), ("cases", list)):
        if not isinstance(data.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    for key, kind in (("model", dict), ("server_settings", dict), ("ollama", dict),
                      ("warmups", list)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            return f"'{key}' is not a {kind.__name__}"
    for number, case in enumerate(data["cases"], 1):
        if not isinstance(case, dict) or not isinstance(case.get("prompt"), str) \
                or not isinstance(case.get("concurrency"), int) \
                or not isinstance(case.get("repeats"), int) \
                or not isinstance(case.get("metrics"), dict):
            return f"case {number} lacks prompt, concurrency, repeats or metrics"
        for key, stats in case["metrics"].items():
            if stats is not None and not (isinstance(stats, dict) and all(
                    isinstance(stats.get(k), _NUMBER) for k in ("median", "spread"))):
                return f"case {number}: metric '{key}' has no numeric median and spread"
    for warm in data.get("warmups") or []:
        if not isinstance(warm, dict) or not isinstance(warm.get("prompt"), str) or not all(
                isinstance(warm.get(k), _NUMBER) for k in ("load_s", "total_s")):
            return "a warm-up lacks prompt, load_s or total_s"
    return ""


def server_of(result: dict[str, Any]) -> dict[str, Any]:
    """The server a result measured (results before llama-server support name Ollama's)."""
    server = result.get("server")
    if isinstance(server, dict):
        return server
    ollama = result.get("ollama")
    return {"name": "ollama", "kind": "ollama", **(ollama if isinstance(ollama, dict) else {})}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """One line's worth of a (checked) result: id, time, server, model, purpose, status,
    headline."""
    cases = result["cases"]
    first = cases[0]["metrics"].get("gen_tps") if cases else None
    return {"id": result["id"], "time": result.get("time"),
            "server": server_of(result).get("name"),
            "model": result["spec"].get("model"),
            "purpose": result["spec"].get("purpose"),
            "complete": result.get("complete"), "error": result.get("error"),
            "status": status_of(result),
            "cases": len(cases), "gen_tps": first["median"] if first else None,
            "settings": result.get("server_settings") or {}}


def status_of(result: dict[str, Any]) -> str:
    """complete, interrupted (the client went away) or partial (an error or the deadline)."""
    if result.get("complete"):
        return "complete"
    return "interrupted" if result.get("error_kind") == "interrupted" else "partial"
