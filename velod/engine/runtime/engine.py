"""The engine: geometry, KV-cache pool, scheduler, attention backend and one step at a time.

No asyncio and no sockets here. A step is three calls, so a caller can run the middle one
in a worker thread while the scheduler stays on its own thread::

    batch = engine.schedule()           # Python bookkeeping (scheduler, block tables)
    result = engine.execute(batch)      # the device work: q/k/v, cache writes, attention
    outcome = engine.complete(batch, result)   # sampled tokens back to the scheduler

``execute`` touches only the KV pool and the model; ``submit``/``abort`` may run between
``schedule`` and ``complete`` (the scheduler ignores tokens of a request aborted meanwhile).
Prefill tokens go through the same decode kernel as decode tokens: each becomes one query row
whose context is its own position plus one, over the sequence's block table, so causal
attention over a chunk needs no second kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from velod.engine.core.errors import EngineError
from velod.engine.core.scheduler import Scheduler
from velod.engine.core.sequence import FinishedRequest
from velod.engine.core.step import StepBatch
from velod.engine.runtime.metrics import KERNEL_PHASES, PHASES, StepRecord, StepWindow
from velod.engine.runtime.pool import KVPool, PoolError, plan_pool
from velod.engine.runtime.synthetic import Model, SyntheticModel, dense_attention
from velod.engine.settings import EngineSettings
from velod.kernels import AttentionBackend
from velod.kernels.layout import check_slots, to_float32

if TYPE_CHECKING:
    from velod.engine.models.sampling import SampleResult, SamplerState, SamplingParams

MAX_ROWS_PER_CALL = 65535  # the CUDA kernel's grid limit on sequences per call

_Record = tuple[np.ndarray, list[tuple[int, int]]]  # flat token rows, (request id, position)


@dataclass
class RequestTrack:
    """Timing of one request: when it was submitted, got its first token, its last one."""

    id: int
    submitted: float
    prompt_tokens: int
    max_new_tokens: int
    tag: str | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    gaps: list[float] | None = None  # inter-token latencies, kept for benchmarks

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted


@dataclass
class StepResult:
    """What ``execute`` returns: the sampled tokens and the time of each phase."""

    tokens: np.ndarray
    phases: dict[str, float] = field(default_factory=dict)
    kernel_s: float | None = None
    sampled: SampleResult | None = None  # with log-probabilities, when requests sampled


@dataclass
class StepOutcome:
    """What ``complete`` returns: finished requests (with their timing), the step record,
    and the token each sampled sequence got this step (``seq_ids[i]`` got ``tokens[i]``)."""

    finished: list[tuple[FinishedRequest, RequestTrack | None]]
    record: StepRecord | None
    seq_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sampled: SampleResult | None = None


class Engine:
    """One model geometry, its KV pool, a scheduler, an attention backend and a model."""

    def __init__(self, settings: EngineSettings, backend: AttentionBackend, pool: KVPool,
                 model: Model, *, profile: bool = False) -> None:
        self.settings = settings
        self.geometry = settings.geometry
        self.backend = backend
        self.pool = pool
        self.model = model
        self.profile = profile
        self.scheduler = Scheduler(settings.scheduler_config(pool.num_blocks, model.vocab_size))
        self.scale = 1.0 / math.sqrt(settings.geometry.head_dim)
        self.window = StepWindow()
        self.tracks: dict[int, RequestTrack] = {}
        self.watch: dict[int, set[int]] = {}  # request id -> positions whose output to keep
        self.samplers: dict[int, SamplerState] = {}  # request id -> its sampling state
        self.recorded: dict[int, dict[int, np.ndarray]] = {}  # id -> position -> [layers,H,D]
        self.created = time.monotonic()
        self.last_active = self.created
        self._schedule_s = 0.0
        self._out: Any = None
        self._clock = backend.clock() if profile else None

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, *,
               priority: int = 0, tag: str | None = None, keep_gaps: bool = False,
               sampling: SamplingParams | None = None) -> int:
        """Queue a request; returns its id (InvalidRequest / QueueFull from the scheduler).

        With ``sampling`` its tokens are drawn from the model's logits with those params
        (a model without logits picks its own); without, the model's own choice."""
        seq_id = self.scheduler.submit(prompt, max_new_tokens, priority=priority)
        if sampling is not None and hasattr(self.model, "logits"):
            from velod.engine.models.sampling import SamplerState

            self.samplers[seq_id] = SamplerState(sampling, prompt)
        self.tracks[seq_id] = RequestTrack(seq_id, time.monotonic(), len(prompt),
                                           max_new_tokens, tag, gaps=[] if keep_gaps else None)
        self.last_active = time.monotonic()
        return seq_id

    def abort(self, seq_id: int) -> bool:
        """Drop a live request; False when it is not live."""
        self.tracks.pop(seq_id, None)
        self.watch.pop(seq_id, None)
        self.samplers.pop(seq_id, None)
        return self.scheduler.abort(seq_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepBatch:
        start = time.perf_counter()
        batch = self.scheduler.step()
        self._schedule_s = time.perf_counter() - start
        return batch

    def execute(self, batch: StepBatch) -> StepResult:
        """The device work of one step; safe to run in a worker thread."""
        if batch.is_empty:
            return StepResult(np.zeros(0, np.int32))
        with self.backend.active():  # launches (and frees) need the device current here
            return self._execute(batch)

    def _execute(self, batch: StepBatch) -> StepResult:
        backend, pool, model = self.backend, self.pool, self.model
        clock = self._clock
        phases = dict.fromkeys(PHASES, 0.0)
        tick = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal tick
            now = time.perf_counter()
            phases[name] += now - tick
            tick = now

        if len(batch.copies):
            mark = clock.start() if clock else None
            for layer in range(self.geometry.layers):
                backend.copy_blocks(pool.keys[layer], pool.values[layer], batch.copies)
            if clock:
                clock.stop(mark)
            lap("copy")
        # Every token is one query row over its own sequence's blocks, context = position + 1.
        rows = np.repeat(np.arange(batch.num_seqs), batch.query_lens)
        tables = np.ascontiguousarray(batch.block_tables[rows])
        lens = (batch.positions + 1).astype(np.int32)
        if self.settings.prefill_attention == "last":
            keep = np.zeros(len(lens), bool)
            keep[batch.sample_indices] = True
            lens[~keep] = 0  # the kernels skip rows with an empty context
        longest = int(lens.max())
        record = self._record_plan(batch, rows, lens)
        # One upload of each index array per step, all before the first launch: a
        # host-to-device copy from pageable memory waits for the device, so an upload
        # inside the layer loop would serialize the launches (on the host: no copy).
        check_slots(batch.slot_mapping, pool.num_blocks * self.settings.block_size)
        slots = backend.stage("engine.slots", batch.slot_mapping)
        tables = backend.stage("engine.tables", tables)
        lens_arg = backend.stage("engine.lens", lens)
        outputs: list[Any] = []
        out = self._device_out(len(lens))  # one output view for every layer of the step
        model.begin_step(batch.token_ids, batch.positions)
        lap("prepare")
        for layer in range(self.geometry.layers):
            mark = clock.start() if clock else None
            q, k, v = model.layer_qkv(layer)
            if clock:
                clock.stop(mark)
            lap("model")
            mark = clock.start() if clock else None
            backend.write_cache(k, v, pool.keys[layer], pool.values[layer], slots)
            if clock:
                clock.stop(mark)
            lap("write")
            mark = clock.start() if clock else None
            result = self._attention(q, layer, tables, lens_arg, longest, out)
            if clock:
                clock.stop(mark)
            lap("attention")
            model.layer_output(layer, result)
            if record is not None and result is not None:
                outputs.append(to_float32(backend.to_host(result)[record[0]]))
        tokens, sampled = self._sample(batch)
        backend.synchronize()
        lap("sample")
        if record is not None and outputs:
            self._keep_outputs(record, outputs)
        kernel_s = clock.total() if clock else None
        return StepResult(tokens, phases, kernel_s, sampled)

    def _sample(self, batch: StepBatch) -> tuple[np.ndarray, SampleResult | None]:
        """The next token of each sampled row: drawn with its request's params when any
        request of the model asked for sampling, else the model's own choice."""
        samplers = self.samplers
        if not samplers:
            return self.model.sample(batch.sample_indices), None
        from velod.engine.models.sampling import sample

        # Requests submitted without params are greedy; the shared state records nothing.
        states = [samplers.get(seq_id) or _greedy_state()
                  for seq_id in batch.sample_seq_ids.tolist()]
        result = sample(self.model.logits(batch.sample_indices), states)  # type: ignore[attr-defined]
        return result.tokens, result

    def _attention(self, q: Any, layer: int, tables: Any, lens: Any, longest: int,
                   out: Any) -> Any:
        backend, pool = self.backend, self.pool
        rows = q.shape[0]
        if longest == 0:
            return None  # prefill_attention="last" and no row of this step is sampled
        if rows <= MAX_ROWS_PER_CALL:
            return backend.paged_attention(q, pool.keys[layer], pool.values[layer], tables,
                                           lens, self.scale, max_context=longest, out=out)
        parts = [backend.to_host(backend.paged_attention(
            q[i:i + MAX_ROWS_PER_CALL], pool.keys[layer], pool.values[layer],
            tables[i:i + MAX_ROWS_PER_CALL], lens[i:i + MAX_ROWS_PER_CALL], self.scale,
            max_context=longest)) for i in range(0, rows, MAX_ROWS_PER_CALL)]
        return np.concatenate(parts)

    def _device_out(self, rows: int) -> Any:
        """A reused output buffer on a device (no allocation per layer); None on the host,
        where the attention call's own result is the output."""
        if not self.backend.on_device or rows > MAX_ROWS_PER_CALL:
            return None
        buffer = self._out
        if buffer is None or buffer.shape[0] < rows:
            g = self.geometry
            buffer = self._out = self.backend.empty((max(rows, 256), g.heads, g.head_dim),
                                                    self.pool.dtype)
        return buffer[:rows]

    def complete(self, batch: StepBatch, result: StepResult) -> StepOutcome:
        """Feed the sampled tokens back; returns finished requests and the step record."""
        start = time.perf_counter()
        if batch.is_empty:
            return StepOutcome([], None)
        done = self.scheduler.complete_step(batch, result.tokens)
        now = time.monotonic()
        tracks = self.tracks
        for seq_id in batch.sample_seq_ids.tolist():
            track = tracks.get(seq_id)
            if track is None:
                continue
            if track.first_token is None:
                track.first_token = now
            elif track.gaps is not None and track.last_token is not None:
                track.gaps.append(now - track.last_token)
            track.last_token = now
            track.generated += 1
        finished = [(request, tracks.pop(request.id, None)) for request in done]
        for request in done:
            self.watch.pop(request.id, None)
            self.samplers.pop(request.id, None)
        phases = result.phases
        phases["schedule"] = self._schedule_s
        phases["complete"] = time.perf_counter() - start
        step_s = sum(phases.values())
        kernel_s = (result.kernel_s if result.kernel_s is not None
                    else sum(phases[p] for p in KERNEL_PHASES))
        record = StepRecord(
            time=now, batch_size=batch.num_seqs,
            prefill_tokens=batch.num_tokens - batch.num_decode, decode_tokens=batch.num_decode,
            generated=len(batch.sample_seq_ids), step_s=step_s,
            phases=tuple(phases[p] for p in PHASES), kernel_s=kernel_s,
            utilization=self.scheduler.block_manager.utilization,
            preempted=len(batch.preempted))
        self.window.add(record)
        self.last_active = now
        return StepOutcome(finished, record, batch.sample_seq_ids, result.tokens, result.sampled)

    def step(self) -> StepOutcome:
        """schedule + execute + complete in the calling thread."""
        batch = self.schedule()
        return self.complete(batch, self.execute(batch))

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[tuple[FinishedRequest,
                                                                      RequestTrack | None]]:
        """Step until no work is left; returns every request that finished."""
        finished = []
        for _ in range(max_steps):
            if not self.has_work:
                return finished
            finished.extend(self.step().finished)
        raise EngineError(f"still busy after {max_steps} steps")

    def close(self) -> None:
        """Frees the KV pool and the device buffers now rather than whenever the garbage
        collector gets to them; on CUDA inside the device context, so any thread may call
        it (PyCUDA cannot free memory of a context that is not current in the thread), and
        the backend's reusable buffers too. Only while no step is executing."""
        close_model = getattr(self.model, "close", None)
        with self.backend.active():
            if close_model is not None:
                close_model()
            self.pool.keys.clear()
            self.pool.values.clear()
            self._out = None
            self._clock = None
            self.backend.trim()

    # ------------------------------------------------------------------ verification

    def _record_plan(self, batch: StepBatch, rows: np.ndarray,
                     lens: np.ndarray) -> _Record | None:
        watch = dict(self.watch)  # a snapshot: the loop may add or drop entries meanwhile
        if not watch:
            return None
        token_ids = batch.seq_ids[rows]
        candidates = np.flatnonzero(np.isin(token_ids, np.fromiter(watch, np.int64)))
        keep = [(int(i), int(token_ids[i]), int(batch.positions[i])) for i in candidates
                if lens[i] and int(batch.positions[i]) in watch.get(int(token_ids[i]), ())]
        if not keep:
            return None
        return np.array([i for i, _, _ in keep]), [(s, p) for _, s, p in keep]

    def _keep_outputs(self, record: _Record, outputs: list[np.ndarray]) -> None:
        stacked = np.stack(outputs, axis=1)  # [rows, layers, heads, dim]
        for i, (seq_id, position) in enumerate(record[1]):
            self.recorded.setdefault(seq_id, {})[position] = stacked[i]

    def verify(self, seq_id: int, token_ids: np.ndarray) -> dict[str, Any]:
        """Compare a finished sequence's recorded outputs with a dense recomputation.

        ``token_ids`` is the whole sequence (prompt + generated). Needs the synthetic model.
        """
        if not isinstance(self.model, SyntheticModel):
            raise EngineError("verification needs the synthetic model's q/k/v")
        recorded = self.recorded.pop(seq_id, {})
        positions = sorted(recorded)
        if not positions:
            return {"id": seq_id, "positions": [], "max_abs_error": None}
        error = 0.0
        for layer in range(self.geometry.layers):
            dense = dense_attention(self.model, token_ids, positions, layer)
            got = np.stack([recorded[p][layer] for p in positions])
            error = max(error, float(np.abs(got - dense).max()))
        return {"id": seq_id, "positions": positions, "max_abs_error": error}

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        stats = self.scheduler.stats()
        hit = stats.prefix_hit_tokens
        query = stats.prefix_query_tokens
        return {
            "backend": self.backend.name,
            "device": self.backend.device_name or "cpu",
            "model": {"name": self.model.name, "kind": self.model.kind},
            "geometry": self.settings.geometry_dict(),
            "dtype": self.settings.dtype,
            "pool": {"allocated": True, "bytes": self.pool.nbytes,
                     "block_bytes": self.pool.plan.block_bytes,
                     "block_size": self.settings.block_size, "blocks": stats.blocks_total,
                     "blocks_free": stats.blocks_free, "blocks_used": stats.blocks_used,
                     "blocks_cached": stats.blocks_cached, "utilization": stats.utilization,
                     "tokens": stats.blocks_total * self.settings.block_size},
            "running": stats.running, "waiting": stats.waiting, "steps": stats.steps,
            "submitted": stats.submitted, "finished": stats.finished, "aborted": stats.aborted,
            "rejected": stats.rejected, "generated_tokens": stats.generated_tokens,
            "preemptions": stats.preemptions,
            "prefix_cache": {"hit_tokens": hit, "query_tokens": query,
                             "hit_rate": hit / query if query else 0.0},
            **self.window.summary(time.monotonic()),
        }


_GREEDY: list[SamplerState] = []


def _greedy_state() -> SamplerState:
    """One shared greedy state: greedy sampling without penalties keeps no state."""
    if not _GREEDY:
        from velod.engine.models.sampling import SamplerState, SamplingParams

        _GREEDY.append(SamplerState(SamplingParams(temperature=0.0, penalty_window=0)))
    return _GREEDY[0]


def build_engine(settings: EngineSettings, *, backend: AttentionBackend | None = None,
                 model: Model | None = None, profile: bool = False, seed: int = 0) -> Engine:
    """Pick the backend, size and allocate the pool, make the model (blocking: a thread)."""
    if backend is None:
        from velod.kernels import BackendUnavailable, get_backend

        try:
            backend = get_backend(settings.device)
        except BackendUnavailable as exc:
            raise PoolError(f"engine.device is {settings.device!r} but CUDA cannot run: {exc}; "
                            "set engine.device to auto or cpu") from None
    plan = plan_pool(settings, backend.free_memory(), "GPU" if backend.on_device else "host")
    pool = KVPool(settings, plan, backend)
    g = settings.geometry
    if model is None:
        model = SyntheticModel(g.heads, g.kv_heads, g.head_dim, pool.dtype, backend, seed)
    return Engine(settings, backend, pool, model, profile=profile)
