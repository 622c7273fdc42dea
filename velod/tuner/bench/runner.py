"""Run a benchmark against a server: streamed requests, warm-up, repeats, concurrency.

The I/O half of ``velod.tuner.bench.spec``. Each request is the backend's
``bench_request`` (Ollama: streaming ``/api/generate``; llama-server: streaming
``/completion``). A run never raises for the server's failures: it stops at the first one
(or at the deadline) and returns what it measured so far with ``complete: false``, the
error and its kind, so partial results are kept. A run that is cancelled (its client went
away) raises, and :meth:`BenchRunner.results` still has what it measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from velod.tuner.backends.base import (
    Backend,
    ServerBadResponse,
    ServerError,
    ServerHTTPError,
)
from velod.tuner.bench.spec import BenchSpec, Case, Sample, build_prompt, repeat_figures

Progress = Callable[[dict[str, Any]], None]


class BenchRunner:
    """Measures one :class:`BenchSpec` through one server's backend."""

    def __init__(self, backend: Backend, spec: BenchSpec, run_id: str,
                 on_progress: Progress | None = None) -> None:
        self.backend = backend
        self.spec = spec
        self.run_id = run_id
        self.on_progress = on_progress
        self.cases: list[Case] = []
        self.warmups: list[dict[str, Any]] = []
        self.done = 0
        self._sent = 0
        self._started = time.perf_counter()

    async def run(self) -> dict[str, Any]:
        """Measure every case; returns :meth:`results` (with the error that stopped it)."""
        self._started = time.perf_counter()
        try:
            async with asyncio.timeout(self.spec.timeout):
                await self._measure_all()
        except TimeoutError:
            return self.results("timeout", f"the benchmark did not finish within "
                                f"{self.spec.timeout:g}s; partial results kept")
        except ServerHTTPError as exc:
            return self.results("not_found" if exc.status == 404 else "server", str(exc))
        except ServerBadResponse as exc:
            return self.results("bad_response", f"{exc}; partial results kept")
        except ServerError as exc:
            return self.results("unreachable", f"{exc}; partial results kept")
        return self.results()

    def results(self, error_kind: str | None = None, error: str | None = None
                ) -> dict[str, Any]:
        """What was measured so far: cases with at least one repeat, warm-ups, ``complete``
        (no error), ``error``, ``error_kind`` and the time spent."""
        return {"cases": [c.to_dict() for c in self.cases if c.repeats],
                "warmups": self.warmups, "complete": error is None, "error": error,
                "error_kind": error_kind, "elapsed_s": time.perf_counter() - self._started}

    async def _measure_all(self) -> None:
        spec = self.spec
        for kind in spec.prompts:
            self._progress(kind, None, "warm-up")
            warm = await self._request(kind)  # loads the model; excluded from the figures
            self.warmups.append({"prompt": kind, **warm.to_dict()})
            self.done += 1
            for level in spec.concurrency:
                case = Case(kind, level)
                self.cases.append(case)
                for _ in range(spec.repeat):
                    self._progress(kind, level, "measure")
                    t0 = time.perf_counter()
                    results = await asyncio.gather(*(self._request(kind) for _ in range(level)),
                                                   return_exceptions=True)
                    wall = time.perf_counter() - t0
                    failures = [r for r in results if isinstance(r, BaseException)]
                    if failures:
                        raise failures[0]
                    samples = [r for r in results if isinstance(r, Sample)]
                    case.repeats.append(repeat_figures(samples, wall))
                    case.samples.append([s.to_dict() for s in samples])
                    self.done += level
        self._progress(None, None, "done")

    async def _request(self, kind: str) -> Sample:
        self._sent += 1
        prompt = build_prompt(kind, self.spec.prompt_tokens, tag=f"{self.run_id}-{self._sent}")
        return await self.backend.bench_request(self.spec.model, prompt, self.spec.gen)

    def _progress(self, prompt: str | None, level: int | None, phase: str) -> None:
        if self.on_progress is not None:
            self.on_progress({"id": self.run_id, "phase": phase, "prompt": prompt,
                              "concurrency": level, "done": self.done,
                              "total": self.spec.requests})
