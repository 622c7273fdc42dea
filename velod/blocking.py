"""Run blocking calls (NVML, subprocess, disk, GPU launches) off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_MAX_WORKERS = 8


class _DaemonPool:
    """A tiny thread pool of *daemon* threads.

    concurrent.futures joins its workers at interpreter exit, so one call hung in a
    driver would keep the daemon from exiting; daemon threads do not.
    """

    def __init__(self, max_workers: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            queue.SimpleQueue())
        self._max = max_workers
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        with self._lock:
            if self._idle == 0 and self._threads < self._max:
                self._threads += 1
                threading.Thread(target=self._work, name=f"velod-io-{self._threads}",
                                 daemon=True).start()
        self._jobs.put((fn, future))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            fn, future = self._jobs.get()
            with self._lock:
                self._idle -= 1
            _run_job(fn, future)


def _run_job(fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
    loop = future.get_loop()
    try:
        result, exc = fn(), None
    except BaseException as error:
        result, exc = None, error
    # A call that outlived its loop (it hung past a timeout at shutdown) has no one
    # left to tell; the worker must survive it.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled or timed out meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


_pool = _DaemonPool(_MAX_WORKERS)


async def run_blocking(fn: Callable[..., T], *args: object, timeout: float | None = None) -> T:
    """Run ``fn(*args)`` in a worker thread; raise ``TimeoutError`` after ``timeout`` s.

    On timeout the thread cannot be killed; it finishes (or hangs) in the background
    while the event loop carries on, and callers treat that source as failed.
    """
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    _pool.submit(lambda: fn(*args), future)
    if timeout is None:
        return await future
    return await asyncio.wait_for(future, timeout)


class SerialWorker:
    """One daemon thread that runs its calls in order, for work that keeps per-thread state
    warm: an engine's steps reuse one thread's scratch buffers and malloc arena instead of
    growing one per pool thread that happens to run a step."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in this worker's thread, after the calls queued before it."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((lambda: fn(*args), future))
        return await future

    def _work(self) -> None:
        while True:
            fn, future = self._jobs.get()
            _run_job(fn, future)
