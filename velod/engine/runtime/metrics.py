"""Per-step engine metrics: what one step did and took, and a window over the recent steps."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PHASES = ("schedule", "prepare", "copy", "model", "write", "attention", "sample", "complete")
KERNEL_PHASES = ("copy", "model", "write", "attention")
"""Device work (the kernels on CUDA, the NumPy math on CPU); the rest is Python overhead."""



class PhaseTimer:
    """The wall time of one step's phases, and (with a kernel clock: profiling) the device
    time of its kernels.

    ``lap(name)`` adds the time since the last lap to phase ``name``;
    ``with timer.kernel(name):`` also runs the clock around the launches it holds, then laps.
    """

    __slots__ = ("_mark", "_name", "_tick", "clock", "phases")

    def __init__(self, clock: Any = None) -> None:
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.clock = clock
        self._tick = time.perf_counter()
        self._name = ""
        self._mark: Any = None

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] += now - self._tick
        self._tick = now

    def kernel(self, name: str) -> PhaseTimer:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._mark = self.clock.start() if self.clock else None

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:  # a failed step records nothing
            if self.clock:
                self.clock.stop(self._mark)
            self.lap(self._name)

    def kernel_s(self) -> float | None:
        """The clock's device time (None without one)."""
        return self.clock.total() if self.clock else None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step: sizes, wall time by phase (seconds), and the pool after it."""

    time: float  # monotonic end of the step
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    generated: int
    step_s: float
    phases: tuple[float, ...]  # in PHASES order
    kernel_s: float  # device time: CUDA events when profiled, else the KERNEL_PHASES wall time
    utilization: float
    preempted: int


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation, None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def p50_p99(values: Iterable[float]) -> dict[str, float | None]:
    data = list(values)
    return {"p50": percentile(data, 50), "p99": percentile(data, 99)}


class StepWindow:
    """The last ``size`` steps, for status: tokens/s, step time percentiles, phase shares."""

    def __init__(self, size: int = 512) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=size)

    def add(self, record: StepRecord) -> None:
        self.steps.append(record)

    def clear(self) -> None:
        self.steps.clear()

    def summary(self, now: float, interval: float = 10.0) -> dict[str, object]:
        recent = [s for s in self.steps if now - s.time <= interval]
        tokens = sum(s.generated for s in recent)
        processed = sum(s.prefill_tokens + s.decode_tokens for s in recent)
        last = self.steps[-1] if self.steps else None
        return {
            "interval_s": interval,
            "tokens_per_s": tokens / interval,
            "processed_tokens_per_s": processed / interval,
            "step_s": p50_p99(s.step_s for s in self.steps),
            "last_step": None if last is None else {
                "batch_size": last.batch_size, "prefill_tokens": last.prefill_tokens,
                "decode_tokens": last.decode_tokens, "step_s": last.step_s,
                "kv_utilization": last.utilization, "preempted": last.preempted,
            },
            "breakdown": breakdown(self.steps),
        }


def breakdown(steps: Iterable[StepRecord]) -> dict[str, float]:
    """Total seconds per phase over ``steps`` and the share outside the kernels."""
    records = list(steps)
    totals = [0.0] * len(PHASES)
    step_total = kernel_total = 0.0
    for record in records:
        for i, value in enumerate(record.phases):
            totals[i] += value
        step_total += record.step_s
        kernel_total += record.kernel_s
    out = {f"{name}_s": round(value, 6) for name, value in zip(PHASES, totals, strict=True)}
    out["step_s"] = round(step_total, 6)
    out["kernel_s"] = round(kernel_total, 6)
    out["overhead_share"] = (round(1 - kernel_total / step_total, 4) if step_total > 0
                             else 0.0)
    return out
