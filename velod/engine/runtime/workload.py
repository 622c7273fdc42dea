"""A benchmark workload through the engine: N requests x prompt length x generation length.

:class:`BenchRun` submits the requests, follows them step by step and summarizes tokens/s,
time to first token, per-token latency, KV utilization, preemptions and prefix-cache hits.
It is driven by whoever steps the engine (the daemon's loop, or ``bench/engine.py``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from velod.engine.core.sequence import FinishedRequest
from velod.engine.models.sampling import SamplingParams
from velod.engine.runtime.engine import Engine, RequestTrack
from velod.engine.runtime.metrics import StepRecord, breakdown, p50_p99
from velod.engine.runtime.synthetic import VOCAB_SIZE

PRIORITY_LEVELS = (-1, 0, 1)


@dataclass(frozen=True)
class Workload:
    """The shape of a benchmark; ``shared_prefix`` is the fraction of each prompt all share."""

    requests: int = 64
    prompt: int = 512
    gen: int = 128
    shared_prefix: float = 0.0
    priority: bool = False  # spread requests over priorities -1, 0, 1
    verify: int = 0  # sequences whose attention outputs are checked against a dense recompute
    seed: int = 0

    def prompts(self, vocab_size: int = VOCAB_SIZE) -> list[np.ndarray]:
        """Deterministic prompts: a common prefix, then tokens unique to each request (ids
        below ``vocab_size`` and the synthetic model's vocabulary)."""
        rng = np.random.default_rng(self.seed)
        vocab = min(vocab_size, VOCAB_SIZE)
        shared = int(self.prompt * self.shared_prefix)
        prefix = rng.integers(0, vocab, shared, dtype=np.int32)
        return [np.concatenate((prefix, rng.integers(0, vocab, self.prompt - shared,
                                                     dtype=np.int32)))
                for _ in range(self.requests)]

    def priorities(self) -> list[int]:
        if not self.priority:
            return [0] * self.requests
        return [PRIORITY_LEVELS[i % len(PRIORITY_LEVELS)] for i in range(self.requests)]

    def verified_indices(self) -> list[int]:
        if self.verify <= 0:
            return []
        count = min(self.verify, self.requests)
        return sorted({round(i) for i in np.linspace(0, self.requests - 1, count)})

    def checked_positions(self, block_size: int) -> set[int]:
        """Positions whose outputs are recorded for verification: block edges, the prompt's
        end, the first decode steps, the middle and the last position fed to the model."""
        p, last = self.prompt, self.prompt + self.gen - 2
        picks = {0, 1, block_size - 1, block_size, p // 2, p - 1, p, p + 1, p + self.gen // 2,
                 last}
        return {x for x in picks if 0 <= x <= last}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BenchRun:
    """One workload in flight: submit, observe steps and finished requests, summarize."""

    def __init__(self, engine: Engine, workload: Workload, tag: str,
                 prompts: list[np.ndarray] | None = None, *, submit: bool = True) -> None:
        self.engine = engine
        self.workload = workload
        self.tag = tag
        self._base = engine.scheduler.stats()
        self.prompts = (prompts if prompts is not None
                        else workload.prompts(engine.model.vocab_size))
        # A language model generates exactly `gen` tokens each: greedy, past its
        # end-of-generation tokens.
        self._sampling = (SamplingParams(temperature=0.0, ignore_eos=True) if engine.language
                          else None)
        self._priorities = workload.priorities()
        self._verified = set(workload.verified_indices())
        self._positions = workload.checked_positions(engine.settings.block_size)
        self.ids: list[int] = []
        self._index: dict[int, int] = {}
        self.finished: dict[int, FinishedRequest] = {}
        self.tracks: dict[int, RequestTrack] = {}
        self.steps: list[StepRecord] = []
        self.started = time.monotonic()
        self.ended: float | None = None
        self.verify_ids: set[int] = set()
        if submit:
            self.submit(len(self.prompts))

    @property
    def submitted_all(self) -> bool:
        return len(self.ids) == len(self.prompts)

    def submit(self, count: int) -> None:
        """Submit the next ``count`` requests (all of them, in chunks, from an event loop).

        On an error (InvalidRequest, QueueFull) every request of the run is aborted.
        """
        engine = self.engine
        try:
            for index in range(len(self.ids), min(len(self.ids) + count, len(self.prompts))):
                seq_id = engine.submit(self.prompts[index], self.workload.gen,
                                       sampling=self._sampling,
                                       priority=self._priorities[index], tag=self.tag,
                                       keep_gaps=True)
                self.ids.append(seq_id)
                self._index[seq_id] = index
                if index in self._verified:
                    engine.watch[seq_id] = set(self._positions)
                    self.verify_ids.add(seq_id)
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        for seq_id in self.ids:
            self.engine.abort(seq_id)

    @property
    def done(self) -> bool:
        return self.submitted_all and len(self.finished) == len(self.ids)

    def on_step(self, record: StepRecord | None,
                finished: list[tuple[FinishedRequest, RequestTrack | None]]) -> None:
        if record is not None:
            self.steps.append(record)
        for request, track in finished:
            if request.id in self._index:
                self.finished[request.id] = request
                if track is not None:
                    self.tracks[request.id] = track
        if self.done and self.ended is None:
            self.ended = time.monotonic()

    def progress(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        generated = sum(len(r.output_token_ids) for r in self.finished.values()) + sum(
            t.generated for seq_id in self.ids if (t := self.engine.tracks.get(seq_id)))
        total = self.workload.requests * self.workload.gen
        return {"bench": self.tag, "requests": self.workload.requests,
                "finished": len(self.finished), "generated": generated, "target": total,
                "fraction": generated / total if total else 1.0, "elapsed_s": elapsed,
                "tokens_per_s": generated / elapsed if elapsed > 0 else 0.0}

    def verify(self) -> dict[str, Any]:
        """Dense recomputation of the watched sequences (CPU heavy: run in a thread)."""
        checks = []
        for seq_id in sorted(self.verify_ids):
            request = self.finished.get(seq_id)
            if request is None:
                continue
            tokens = np.concatenate((self.prompts[self._index[seq_id]],
                                     np.asarray(request.output_token_ids, np.int32)))
            checks.append(self.engine.verify(seq_id, tokens))
        errors = [c["max_abs_error"] for c in checks if c["max_abs_error"] is not None]
        return {"sequences": len(checks), "positions": sum(len(c["positions"]) for c in checks),
                "max_abs_error": max(errors) if errors else None,
                "dtype": self.engine.settings.dtype}

    def result(self, verify: dict[str, Any] | None = None) -> dict[str, Any]:
        engine = self.engine
        end = self.ended or time.monotonic()
        elapsed = end - self.started
        stats = engine.scheduler.stats()
        outputs = [len(r.output_token_ids) for r in self.finished.values()]
        generated = sum(outputs)
        # Counted per step, so a run cut short still reports what it did.
        sampled = sum(s.generated for s in self.steps)
        processed = sum(s.prefill_tokens + s.decode_tokens for s in self.steps)
        prompt_tokens = self.workload.requests * self.workload.prompt
        hit = stats.prefix_hit_tokens - self._base.prefix_hit_tokens
        query = stats.prefix_query_tokens - self._base.prefix_query_tokens
        gaps = [g for t in self.tracks.values() for g in (t.gaps or ())]
        utilization = [s.utilization for s in self.steps]
        return {
            "workload": self.workload.to_dict(),
            "backend": engine.backend.name,
            "device": getattr(engine.backend, "device_name", None) or "cpu",
            "geometry": engine.settings.geometry_dict(), "dtype": engine.settings.dtype,
            "model": engine.model.kind, "model_name": engine.model.name,
            "pool_blocks": engine.pool.num_blocks, "block_size": engine.settings.block_size,
            "elapsed_s": elapsed, "steps": len(self.steps),
            "finished": len(self.finished),
            "generated_tokens": generated, "prompt_tokens": prompt_tokens,
            "exact_token_counts": bool(outputs) and all(n == self.workload.gen for n in outputs)
            and len(outputs) == self.workload.requests,
            "sampled_tokens": sampled,
            "tokens_per_s": sampled / elapsed if elapsed > 0 else 0.0,
            "processed_tokens_per_s": processed / elapsed if elapsed > 0 else 0.0,
            "ttft_s": p50_p99(t.ttft for t in self.tracks.values() if t.ttft is not None),
            "token_latency_s": p50_p99(gaps),
            "step_s": p50_p99(s.step_s for s in self.steps),
            "batch_size": p50_p99(float(s.batch_size) for s in self.steps),
            "kv_utilization": {"mean": float(np.mean(utilization)) if utilization else 0.0,
                               "max": max(utilization, default=0.0)},
            "preemptions": stats.preemptions - self._base.preemptions,
            "prefix_cache": {"hit_tokens": hit, "query_tokens": query,
                             "hit_rate": hit / query if query else 0.0},
            "breakdown": breakdown(self.steps),
            "decode_breakdown": breakdown(s for s in self.steps if not s.prefill_tokens),
            "decode_step_s": p50_p99(s.step_s for s in self.steps if not s.prefill_tokens),
            "decode_batch_size": p50_p99(float(s.batch_size) for s in self.steps
                                         if not s.prefill_tokens),
            "verify": verify,
        }
