"""Watch the config file's directory and call back when the file's content changes.

Editors save in place or write a temporary file and rename it over the original
(vim, ``sed -i``), so the directory is watched, not the file. watchfiles' default
1.6 s debounce is far too slow for an interactive edit; a short ``step`` yields a
change as soon as the directory has been quiet for that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("velod.config")

STEP_MS = 30  # quiet time after the last change before we look
DEBOUNCE_MS = 400  # upper bound on grouping a burst of changes
MISSING_DIR_POLL = 2.0


def file_digest(path: Path) -> bytes | None:
    """SHA-256 of the file's bytes, or None when it does not exist or cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


async def watch_config(path: Path, on_change: Callable[[], Awaitable[object]],
                       stop: asyncio.Event) -> None:
    """Call ``on_change()`` whenever ``path``'s content differs from the last one seen."""
    from watchfiles import awatch  # lazy: the client never needs it

    last = file_digest(path)
    directory = path.parent
    while not stop.is_set():
        if not directory.is_dir():
            await _pause(stop, MISSING_DIR_POLL)
            continue
        try:
            async for changes in awatch(directory, stop_event=stop, recursive=False,
                                        debounce=DEBOUNCE_MS, step=STEP_MS,
                                        watch_filter=lambda _c, p: Path(p).name == path.name):
                if not changes:
                    continue
                digest = file_digest(path)
                if digest != last:
                    last = digest
                    await on_change()
        except (OSError, RuntimeError) as exc:  # directory removed, inotify limits, ...
            log.warning("watching %s failed (%s); retrying", directory, exc)
            await _pause(stop, MISSING_DIR_POLL)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
