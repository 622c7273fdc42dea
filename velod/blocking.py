"""Run blocking calls (NVML, subprocess, disk, GPU launches) off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Daemon threads: a call hung in a driver must not keep the process alive at exit.
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="velod-io")


async def run_blocking(fn: Callable[..., T], *args: object, timeout: float | None = None) -> T:
    """Run ``fn(*args)`` in a worker thread; raise ``TimeoutError`` after ``timeout`` s.

    On timeout the thread cannot be killed; it finishes (or hangs) in the background
    while the event loop carries on. Callers treat such a source as failed.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_executor, functools.partial(fn, *args))
    if timeout is None:
        return await future
    return await asyncio.wait_for(future, timeout)
