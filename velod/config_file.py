"""The config file as the daemon sees it (loaded, missing or blank), and config checks run
off the event loop, one at a time per lane, bounded in time and in queue length.
(Checking config text itself is ``velod.config.validate_text``.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from velod.blocking import run_blocking
from velod.config import Config, parse_config, parse_yaml, read_config_text

T = TypeVar("T")

FileState = Literal["loaded", "missing", "blank"]
BLANK_HINT = "write '{}' to mean the built-in defaults"


@dataclass(frozen=True)
class FileConfig:
    """What a config file holds: its config, or the built-in defaults when it holds none."""

    config: Config
    state: FileState

    def describe(self, path: Path) -> str:
        """A sentence for the log and status: where this config comes from."""
        if self.state == "missing":
            return f"{path} does not exist (or is a dangling symlink)"
        if self.state == "blank":
            return f"{path} is empty or only comments"
        return f"loaded from {path}"


def read_file(path: Path) -> FileConfig:
    """Read and validate ``path`` (blocking); ConfigError when it is invalid.

    An empty, comment-only or ``null`` document is "blank", not the defaults: an editor
    that truncates and then writes must not flip a running daemon to its defaults.
    """
    text = read_config_text(path)
    if text is None:
        return FileConfig(Config(), "missing")
    data = parse_yaml(text, str(path))
    if data is None:
        return FileConfig(Config(), "blank")
    return FileConfig(parse_config(data, str(path)), "loaded")


class LaneBusy(Exception):
    """Too many checks are already waiting in this lane."""


class CheckLanes:
    """Runs blocking config checks in a worker thread: one at a time per lane.

    A check that outlives ``timeout`` raises TimeoutError to its caller, but its lane
    stays taken until the thread really finishes, so abandoned checks never pile up
    threads. Lanes keep callers apart: a stream of checks from unprivileged peers cannot
    delay an admin's check or a reload.
    """

    def __init__(self, timeout: float = 5.0, max_waiting: int = 4) -> None:
        self.timeout = timeout
        self.max_waiting = max_waiting
        self._locks: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}

    async def run(self, lane: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread; LaneBusy or TimeoutError when it cannot be done in time."""
        lock = self._locks.setdefault(lane, asyncio.Semaphore(1))
        if self._waiting.get(lane, 0) >= self.max_waiting:
            raise LaneBusy(f"{self.max_waiting} config checks are already waiting")
        self._waiting[lane] = self._waiting.get(lane, 0) + 1
        try:
            await asyncio.wait_for(lock.acquire(), self.timeout)
        except TimeoutError:
            raise LaneBusy(f"a config check has been running for over {self.timeout:g}s"
                           ) from None
        finally:
            self._waiting[lane] -= 1
        job = asyncio.ensure_future(run_blocking(fn, *args))
        job.add_done_callback(lambda done: (lock.release(), done.cancelled() or done.exception()))
        return await asyncio.wait_for(asyncio.shield(job), self.timeout)
