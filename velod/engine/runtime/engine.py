"""The engine: geometry, KV-cache pool, scheduler, attention backend and one step at a time.

No asyncio and no sockets here. A step is three calls, so a caller can run the middle one
in a worker thread while the scheduler stays on its own thread::

    batch = engine.schedule()           # Python bookkeeping (scheduler, block tables)
    result = engine.execute(batch)      # the device work: q/k/v, cache writes, attention
    outcome = engine.complete(batch, result)   # sampled tokens back to the scheduler

``execute`` touches only the KV pool and the model; ``submit``/``abort`` may run between
``schedule`` and ``complete`` (the scheduler ignores tokens of a request aborted meanwhile).

A language model (``velod.engine.models.protocol.LanguageModel``: GGUF weights) runs each
layer's attention as the layer asks (its window and scale): the step's decode rows through the
decode kernel, its prompt chunks through the prefill kernel, each chunk attending at once
with a causal mask. Its sliding-window layers keep their K/V in the window pool (see
``velod.engine.core.window_pool``). The sampled rows' logits go through each request's
sampler (``velod.engine.models.sampling``); a token that ends its request (an
end-of-generation token, a stop token) finishes it in the scheduler.

On a GPU the model is the CUDA runner (``velod.engine.models.cuda_runner``). A model without
sliding-window layers whose sampled rows are all plain greedy runs a whole step through the
runner's ``run_batch`` (decode-only steps replay a CUDA graph per batch-size bucket); the
runner reads one block table for every layer, so a model with a window pool (Gemma 3) and any
step that samples goes layer by layer through the same protocol as the NumPy model.

The synthetic model (no weights, a workload for the attention path) sends every prompt token
through the decode kernel as one query row whose context is its own position plus one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velod.engine.core.errors import EngineError, InvalidRequest
from velod.engine.core.scheduler import Scheduler
from velod.engine.core.sequence import FinishedRequest
from velod.engine.core.step import StepBatch
from velod.engine.models.protocol import LanguageModel, LayerAttention, layer_attention
from velod.engine.models.sampling import (
    GREEDY,
    SampleResult,
    SamplerState,
    SamplingParams,
    sample,
)
from velod.engine.runtime.metrics import (
    KERNEL_PHASES,
    PHASES,
    PhaseTimer,
    StepRecord,
    StepWindow,
)
from velod.engine.runtime.pool import KVPool, PoolError, plan_pool
from velod.engine.runtime.synthetic import Model, SyntheticModel, dense_attention
from velod.engine.settings import EngineSettings
from velod.kernels import AttentionBackend
from velod.kernels.layout import check_slots, to_float32

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
    """What ``execute`` returns: the sampled tokens (with their log-probabilities where a
    request asked) and the time of each phase."""

    tokens: np.ndarray
    phases: dict[str, float] = field(default_factory=dict)
    kernel_s: float | None = None
    sampled: SampleResult | None = None


@dataclass(frozen=True, slots=True)
class Sampled:
    """One request's token of this step: its log-probability (None unless the request's
    ``SamplingParams.logprobs``) and, with ``top_logprobs``, the best alternatives."""

    id: int
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class StepOutcome:
    """What ``complete`` returns: each live request's new token, the finished requests (with
    their timing) and the step record."""

    finished: list[tuple[FinishedRequest, RequestTrack | None]]
    record: StepRecord | None
    sampled: list[Sampled] = field(default_factory=list)


class Engine:
    """One model geometry, its KV pool, a scheduler, an attention backend and a model."""

    def __init__(self, settings: EngineSettings, backend: AttentionBackend, pool: KVPool,
                 model: Model, *, profile: bool = False) -> None:
        self.settings = settings
        self.geometry = settings.shape
        self.backend = backend
        self.pool = pool
        self.model = model
        self.profile = profile
        self.scheduler = Scheduler(settings.scheduler_config(
            pool.num_blocks, model.vocab_size, window_blocks=pool.plan.window_blocks))
        self.scale = 1.0 / math.sqrt(self.geometry.head_dim)
        self.language = isinstance(model, LanguageModel)
        self.attention: list[LayerAttention] = [
            layer_attention(model, layer, self.scale) for layer in range(self.geometry.layers)]
        if not self.language and any(a.window for a in self.attention):
            raise EngineError("a sliding-window layer needs a language model (the engine runs "
                              "windowed layers through the LanguageModel protocol)")
        self.eog_ids: frozenset[int] = frozenset(getattr(model, "eog_ids", ()) or ())
        # A runner that computes a whole greedy step itself (the CUDA runner's graphs) over
        # one block table for every layer: only without a window pool.
        whole_step = getattr(model, "run_batch", None)
        self._whole_step = whole_step if self.language and not any(pool.windowed) else None
        self.samplers: dict[int, SamplerState] = {}  # request id -> its sampler (if not greedy)
        self.window = StepWindow()
        self.tracks: dict[int, RequestTrack] = {}
        self.watch: dict[int, set[int]] = {}  # request id -> positions whose output to keep
        self.recorded: dict[int, dict[int, np.ndarray]] = {}  # id -> position -> [layers,H,D]
        self.created = time.monotonic()
        self.last_active = self.created
        self._schedule_s = 0.0
        self._out: Any = None
        self._clock = backend.clock() if profile else None

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: Sequence[int] | np.ndarray, max_new_tokens: int, *,
               sampling: SamplingParams | None = None, priority: int = 0,
               tag: str | None = None, keep_gaps: bool = False) -> int:
        """Queue a request of prompt token ids; returns its id.

        ``max_new_tokens`` bounds what it generates (``sampling.max_tokens`` is the caller's
        to translate into it); ``sampling`` picks each token (None: greedy). It finishes
        early, reason "stop", on a token that ends it (``SamplingParams.ends_generation``: the
        model's end-of-generation tokens unless ``ignore_eos``, its stop token ids).
        InvalidRequest / QueueFull from the scheduler, or a sampling option that does not
        fit the model.
        """
        if sampling is not None:
            if not self.language:
                raise InvalidRequest("sampling", "the synthetic model has no logits to sample "
                                     "from; load a language model")
            sampling.check_vocabulary(self.model.vocab_size)
        seq_id = self.scheduler.submit(prompt, max_new_tokens, priority=priority)
        if sampling is not None:
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
        timer = PhaseTimer(self._clock)
        if len(batch.copies) or len(batch.window_copies):
            with timer.kernel("copy"):
                for layer, windowed in enumerate(pool.windowed):
                    pairs = batch.window_copies if windowed else batch.copies
                    if len(pairs):
                        backend.copy_blocks(pool.keys[layer], pool.values[layer], pairs)
        if self.language:
            return self._execute_language(batch, timer)
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
        timer.lap("prepare")
        for layer in range(self.geometry.layers):
            with timer.kernel("model"):
                q, k, v = model.layer_qkv(layer)
            with timer.kernel("write"):
                backend.write_cache(k, v, pool.keys[layer], pool.values[layer], slots)
            with timer.kernel("attention"):
                result = self._attention(q, layer, tables, lens_arg, longest, out)
            model.layer_output(layer, result)
            if record is not None and result is not None:
                outputs.append(to_float32(backend.to_host(result)[record[0]]))
        tokens = model.sample(batch.sample_indices)
        backend.synchronize()
        timer.lap("sample")
        if record is not None and outputs:
            self._keep_outputs(record, outputs)
        return StepResult(tokens, timer.phases, timer.kernel_s())

    def _execute_language(self, batch: StepBatch, timer: PhaseTimer) -> StepResult:
        """A language model's step: decode rows through the decode kernel, prompt chunks
        through the prefill kernel, each layer in its own pool with its own window."""
        backend, pool, model = self.backend, self.pool, self.model
        if self._whole_step is not None and self._plain_greedy(batch):
            with timer.kernel("model"):
                tokens = np.asarray(self._whole_step(batch, pool.keys, pool.values), np.int32)
            empty = [None] * len(tokens)
            sampled = SampleResult(tokens, np.full(len(tokens), np.nan, np.float32), empty,
                                   list(empty))
            return StepResult(tokens, timer.phases, timer.kernel_s(), sampled)
        nd, seqs = batch.num_decode, batch.num_seqs
        size = self.settings.block_size
        check_slots(batch.slot_mapping, pool.num_blocks * size)
        # One upload of each index array per step, before the first launch (see _execute).
        staged = {"slots": backend.stage("engine.slots", batch.slot_mapping),
                  "tables": backend.stage("engine.tables", batch.block_tables),
                  "lens": backend.stage("engine.lens", batch.context_lens)}
        if batch.window_slot_mapping is not None and batch.window_block_tables is not None:
            check_slots(batch.window_slot_mapping, pool.plan.window_blocks * size)
            staged["window_slots"] = backend.stage("engine.window_slots",
                                                   batch.window_slot_mapping)
            staged["window_tables"] = backend.stage("engine.window_tables",
                                                    batch.window_block_tables)
        starts = batch.query_start_loc[nd:]
        if seqs > nd:
            staged["starts"] = backend.stage("engine.starts", starts - starts[0])
        max_context = int(batch.context_lens[:nd].max()) if nd else 0
        max_query = int(batch.query_lens[nd:].max()) if seqs > nd else 0
        out = None
        if nd and seqs > nd:  # both kinds of rows: each kernel writes its part of one output
            out = self._device_out(batch.num_tokens)
            if out is None:
                g = self.geometry
                out = backend.empty((batch.num_tokens, g.heads, g.head_dim), pool.dtype)
        lens = staged["lens"]
        model.begin_step(batch.token_ids, batch.positions, batch.sample_indices)
        timer.lap("prepare")
        for layer in range(self.geometry.layers):
            with timer.kernel("model"):
                q, k, v = model.layer_qkv(layer)
            keys, values = pool.keys[layer], pool.values[layer]
            windowed = pool.windowed[layer]
            with timer.kernel("write"):
                backend.write_cache(k, v, keys, values,
                                    staged["window_slots" if windowed else "slots"])
            with timer.kernel("attention"):
                tables = staged["window_tables" if windowed else "tables"]
                spec = self.attention[layer]
                if out is None and not nd:
                    result = backend.paged_prefill_attention(
                        q, keys, values, tables, staged["starts"], lens, spec.scale,
                        window=spec.window, max_query_len=max_query)
                elif out is None:
                    result = backend.paged_attention(q, keys, values, tables, lens,
                                                     spec.scale, window=spec.window,
                                                     max_context=max_context)
                else:
                    backend.paged_attention(q[:nd], keys, values, tables[:nd], lens[:nd],
                                            spec.scale, window=spec.window,
                                            max_context=max_context, out=out[:nd])
                    backend.paged_prefill_attention(
                        q[nd:], keys, values, tables[nd:], staged["starts"], lens[nd:],
                        spec.scale, window=spec.window, max_query_len=max_query,
                        out=out[nd:])
                    result = out
            model.layer_output(layer, result)
        timer.lap("model")
        sampled = self._sample(batch)
        backend.synchronize()
        timer.lap("sample")
        return StepResult(sampled.tokens, timer.phases, timer.kernel_s(), sampled)

    def _plain_greedy(self, batch: StepBatch) -> bool:
        """True when every sampled row is the argmax of its logits, nothing else asked."""
        samplers = self.samplers
        return all(state is None or state.simple_greedy
                   for state in map(samplers.get, batch.sample_seq_ids.tolist()))

    def _sample(self, batch: StepBatch) -> SampleResult:
        """The next token of every sampled row: argmax on the model's side when every row is
        plain greedy, else each row through its request's sampler."""
        model, samplers = self.model, self.samplers
        states = [samplers.get(seq_id) for seq_id in batch.sample_seq_ids.tolist()]
        indices = batch.sample_indices
        if all(state is None or state.simple_greedy for state in states):
            tokens = np.asarray(model.sample(indices), np.int32)
            return SampleResult(tokens, np.full(len(tokens), np.nan, np.float32),
                                [None] * len(tokens), [None] * len(tokens))
        logits = model.logits(indices)  # type: ignore[attr-defined]
        return sample(logits, [state or GREEDY for state in states])

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
        where the attention call's own result is the output, unless a language model's step
        mixes decode and prefill rows (two calls write one output)."""
        if (not self.backend.on_device and not self.language) or rows > MAX_ROWS_PER_CALL:
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
        ids = batch.sample_seq_ids.tolist()
        tokens = result.tokens.tolist()
        stops = self._stops(ids, tokens) if self.language else None
        done = self.scheduler.complete_step(batch, result.tokens, stop=stops)
        now = time.monotonic()
        tracks = self.tracks
        sampled = self._sampled(ids, tokens, result.sampled) if self.language else []
        for seq_id in ids:
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
        return StepOutcome(finished, record, sampled)

    def _stops(self, ids: list[int], tokens: list[int]) -> np.ndarray | None:
        """Which sampled rows end their request: an end-of-generation token (unless the
        request ignores them) or one of its stop tokens."""
        eog, samplers = self.eog_ids, self.samplers
        stop = np.array([GREEDY.params.ends_generation(token, eog) if state is None
                         else state.params.ends_generation(token, eog)
                         for token, state in zip(tokens, map(samplers.get, ids), strict=True)],
                        dtype=bool)
        return stop if stop.any() else None

    def _sampled(self, ids: list[int], tokens: list[int],
                 result: SampleResult | None) -> list[Sampled]:
        """The step's tokens of live requests, with what their requests asked to know."""
        tracks = self.tracks
        out = []
        for i, (seq_id, token) in enumerate(zip(ids, tokens, strict=True)):
            if seq_id not in tracks:
                continue  # aborted meanwhile
            logprob, top = None, ()
            if result is not None and not math.isnan(result.logprobs[i]):
                logprob = float(result.logprobs[i])
                top_ids, top_values = result.top_ids[i], result.top_logprobs[i]
                if top_ids is not None and top_values is not None:
                    top = tuple(zip(top_ids.tolist(), top_values.tolist(), strict=True))
            out.append(Sampled(seq_id, token, logprob, top))
        return out

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
        pool: dict[str, Any] = {
            "allocated": True, "bytes": self.pool.nbytes,
            "block_bytes": self.pool.plan.block_bytes, "block_size": self.settings.block_size,
            "blocks": stats.blocks_total, "blocks_free": stats.blocks_free,
            "blocks_used": stats.blocks_used, "blocks_cached": stats.blocks_cached,
            "utilization": stats.utilization,
            "tokens": stats.blocks_total * self.settings.block_size}
        window = self.scheduler.block_manager.window_pool
        if window is not None:
            plan = self.pool.plan
            pool["window"] = {
                "tokens": window.window, "layers": sum(self.pool.windowed),
                "blocks": plan.window_blocks, "block_bytes": plan.window_block_bytes,
                "bytes": plan.window_blocks * plan.window_block_bytes,
                "blocks_free": window.num_free_blocks, "blocks_used": window.num_used_blocks,
                "blocks_cached": window.num_cached_blocks}
        describe = getattr(self.model, "describe", None)
        model = describe() if describe is not None else {"name": self.model.name}
        model.update(kind=self.model.kind, synthetic=not self.language)
        return {
            "backend": self.backend.name,
            "device": self.backend.device_name or "cpu",
            "model": model,
            "geometry": self.settings.geometry_dict(),
            "dtype": self.settings.dtype,
            "pool": pool,
            "running": stats.running, "waiting": stats.waiting, "steps": stats.steps,
            "submitted": stats.submitted, "finished": stats.finished, "aborted": stats.aborted,
            "rejected": stats.rejected, "generated_tokens": stats.generated_tokens,
            "preemptions": stats.preemptions,
            "prefix_cache": {"hit_tokens": hit, "query_tokens": query,
                             "hit_rate": hit / query if query else 0.0},
            **self.window.summary(time.monotonic()),
        }


def build_engine(settings: EngineSettings, *, backend: AttentionBackend | None = None,
                 model: Model | None = None, profile: bool = False, seed: int = 0) -> Engine:
    """Pick the backend, load the model (a language model's weights, or the synthetic one),
    size the pool from its geometry and allocate it (blocking: call from a thread).

    ``model``: a language model already loaded (the service's), run instead of loading one.
    Settings of a language model that is not loaded yet get its geometry here. Raises
    PoolError, or for a model ModelFileError / NotEnoughMemory with the figures.
    """
    if backend is None:
        backend = backend_for(settings)
    if model is None and settings.language_model:
        model = load_language_model(settings, backend)
    try:
        if model is not None and settings.geometry is None:
            settings = settings.with_model(model_geometry(model),
                                           getattr(model, "info", {}).get("path", ""))
        plan = plan_pool(settings, backend.free_memory(),
                         "GPU" if backend.on_device else "host")
        pool = KVPool(settings, plan, backend)
    except BaseException:
        close = getattr(model, "close", None)
        if close is not None:
            close()
        raise
    g = settings.shape
    if model is None:
        model = SyntheticModel(g.heads, g.kv_heads, g.head_dim, pool.dtype, backend, seed)
    return Engine(settings, backend, pool, model, profile=profile)


def backend_for(settings: EngineSettings) -> AttentionBackend:
    """The attention backend ``settings.device`` names; PoolError when CUDA cannot run."""
    from velod.kernels import BackendUnavailable, get_backend

    try:
        return get_backend(settings.device)
    except BackendUnavailable as exc:
        raise PoolError(f"engine.device is {settings.device!r} but CUDA cannot run: {exc}; "
                        "set engine.device to auto or cpu") from None


def load_language_model(settings: EngineSettings, backend: AttentionBackend, *,
                        on_metadata: Callable[[dict[str, Any]], None] | None = None) -> Model:
    """The GGUF model ``settings.model`` names, for ``backend`` (blocking): on a GPU the CUDA
    runner (weights in the cache's type, sized for the scheduler's steps), on the host the
    NumPy model (float32 weights; a fixed engine.kv_cache is kept free for the pool when
    checking the memory for them). ``on_metadata`` gets the file's metadata first."""
    if backend.on_device:
        from velod.engine.models.cuda_runner import load_cuda_model
        from velod.engine.runtime.pool import storage_dtype

        return load_cuda_model(settings.model, backend, dtype=storage_dtype(settings.dtype),
                               max_tokens=settings.max_tokens_per_step,
                               max_seqs=settings.max_batch_size, block_size=settings.block_size,
                               on_metadata=on_metadata)
    from velod.engine.models import load_model

    reserve = settings.kv_cache_bytes or 0
    return load_model(settings.model, dtype=settings.dtype, reserve=reserve,
                      on_metadata=on_metadata)


def model_geometry(model: Any) -> Any:
    """A loaded language model's :class:`~velod.model.metadata.Geometry`."""
    geometry = getattr(model, "geometry", None)
    return geometry if geometry is not None else model.hp.geometry
