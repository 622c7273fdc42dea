"""Blocking work off the event loop: the shared pool and the one-thread serial worker."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from velod.blocking import SerialWorker, run_blocking


def test_serial_worker_runs_every_call_in_order_on_one_thread():
    async def main() -> list[tuple[int, int]]:
        worker = SerialWorker("test-worker")

        def job(i: int) -> tuple[int, int]:
            time.sleep(0.001 * (5 - i))  # later calls are quicker: order still holds
            return i, threading.get_ident()

        return list(await asyncio.gather(*(worker.run(job, i) for i in range(5))))

    results = asyncio.run(main())
    assert [i for i, _ in results] == list(range(5))
    assert len({thread for _, thread in results}) == 1
    assert results[0][1] != threading.get_ident()


def test_serial_worker_raises_the_callers_error_and_keeps_working():
    async def main() -> int:
        worker = SerialWorker("test-worker")
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        return await worker.run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_run_blocking_times_out_without_blocking_the_loop():
    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await run_blocking(time.sleep, 0.5, timeout=0.05)
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.4
