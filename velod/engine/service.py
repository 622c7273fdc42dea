"""The engine as a daemon service: lazy KV pool, a step loop that runs only with work, verbs.

Nothing is allocated until the first ``engine.submit`` or ``engine.bench``; the pool is freed
after ``engine.idle_release`` without work. While requests are live one task steps the
engine: scheduling on the event loop (a few milliseconds at most), the device work of each
step in a worker thread, so the control socket keeps answering during long steps. With no
work there is no task and no timer but the idle-release one: zero CPU. The verbs
(``report``, ``submit``, ``abort``, ``bench``) are what ``velod.engine.rpc`` calls; a config
change reaches the engine through ``reconfigure``, which derives :class:`EngineSettings` once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from velod.blocking import SerialWorker, run_blocking
from velod.component import Component, Context, ReconfigureRefused
from velod.engine.live import Event, LiveGeneration, LiveGenerations
from velod.errors import Busy, InvalidParams, NotFound, Unavailable

if TYPE_CHECKING:
    from velod.config import Config, EngineConfig
    from velod.engine.generation import GenerationRequest
    from velod.engine.runtime.engine import Engine, StepOutcome
    from velod.engine.runtime.workload import BenchRun, Workload
    from velod.engine.served import ServedModel
    from velod.engine.settings import EngineSettings

BUILD_TIMEOUT = 300.0  # allocating a large pool or compiling CUDA kernels the first time
PROGRESS_INTERVAL = 0.25
MAX_EMPTY_STEPS = 1000
SUBMIT_CHUNK = 128
LOAD_TIMEOUT = 600.0  # reading and dequantizing a multi-GB GGUF
PREPARE_TIMEOUT = 10.0  # rendering and tokenizing one prompt (both bounded in size)
PREPARE_SLOTS = 2  # prompts prepared at once: the step's worker thread is never starved


class EngineService(Component):
    """Component ``engine``: owns the engine, steps it while there is work, answers verbs."""

    name = "engine"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.engine: Engine | None = None
        self.settings: EngineSettings | None = None
        self.settings_error: str | None = None
        self._building: asyncio.Task[Engine] | None = None
        self._driver: asyncio.Task[None] | None = None
        self._release: asyncio.TimerHandle | None = None
        self._in_flight: Engine | None = None  # whose execute runs in a worker thread
        self.bench: BenchRun | None = None
        self._bench_done: asyncio.Future[None] | None = None
        self._bench_ids = itertools.count(1)
        self._last_progress = 0.0
        self._last_bench_progress = 0.0
        self.releases = 0
        self.allocations = 0
        # Every step on one thread: its scratch buffers and malloc arena stay warm instead
        # of one set per pool thread that happens to run a step (RSS that only grows).
        self._stepper = SerialWorker("velod-engine")
        self.served: ServedModel | None = None  # the language model, once loaded
        self.live = LiveGenerations()
        self._loading: asyncio.Lock | None = None
        self._prepare_slots: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._adopt(self.config)
        if self.settings_error is None:  # else _adopt left it degraded, with the error
            self.state = "running" if self.config.engine.enabled else "stopped"

    async def stop(self) -> None:
        self.state = "stopping"
        if self._driver is not None:
            self._driver.cancel()
        self._fail_bench("velod is stopping")
        self.live.end_all("abort", "velod is stopping")
        self._drop_engine("stopping")
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        from velod.engine.core.errors import EngineConfigError

        new = config.engine
        try:
            spec = self._derive(new) if new.enabled else None
        except EngineConfigError as exc:
            raise ReconfigureRefused(str(exc)) from None
        if self.served is not None and self.settings is not None and spec is not None and \
                spec.dtype != self.settings.dtype:
            # The loaded model writes its K/V in the cache's element type, chosen at load.
            raise ReconfigureRefused(
                f"engine.dtype {spec.dtype} needs the model loaded again: `velodctl engine "
                f"unload`, reload, then `velodctl engine load {self.served.name}`")
        if spec != self.settings and self._busy():
            engine = self.engine
            load = (f"{engine.scheduler.num_running} running, {engine.scheduler.num_waiting} "
                    "waiting" if engine else "building its pool")
            raise ReconfigureRefused(
                f"the engine is busy ({load}); its new geometry/pool settings were not "
                "applied: run `velodctl reload` again once it is idle")
        if spec != self.settings:
            self._drop_engine("config changed")
        self._adopt(config)
        self.state = "running" if new.enabled else "stopped"
        self._schedule_release()

    def _adopt(self, config: Config) -> None:
        from velod.engine.core.errors import EngineConfigError

        self.config = config
        self.settings, self.settings_error, self.error = None, None, None
        if not config.engine.enabled:
            return
        try:
            self.settings = self._derive(config.engine)
        except EngineConfigError as exc:
            self.settings_error = str(exc)
            self.error = self.settings_error
            self.state = "degraded"

    def _derive(self, engine: EngineConfig) -> EngineSettings:
        """The engine's settings from its config, shaped by the loaded model if any."""
        import dataclasses

        from velod.engine.settings import EngineSettings

        settings = EngineSettings.from_config(engine)
        served = self.served
        if served is None:
            return settings
        return dataclasses.replace(settings, geometry=served.geometry, model=served.name,
                                   source=f"GGUF {served.model.info.get('path', served.name)}")

    def _busy(self) -> bool:
        if self._building is not None or self.bench is not None:
            return True
        return self.engine is not None and self.engine.has_work

    # ------------------------------------------------------------------ the pool

    async def _ensure_engine(self) -> Engine:
        if not self.config.engine.enabled:
            raise Unavailable("the engine is disabled (engine.enabled: false in the config)",
                              {"enabled": False})
        if self.settings is None:
            raise Unavailable(f"the engine config is invalid: {self.settings_error}")
        if self.engine is not None:
            return self.engine
        if self._building is None:
            self._building = asyncio.ensure_future(self._build(self.settings))
        try:
            # Every caller waits for the same build; the build itself adopts the engine, so
            # no waiter can run before it is in place.
            return await asyncio.shield(self._building)
        except (Busy, Unavailable):
            raise
        except Exception as exc:  # the build logged it
            raise Unavailable(str(exc)) from None

    async def _build(self, spec: EngineSettings) -> Engine:
        """Build the engine for ``spec`` in a worker thread and adopt it."""
        from velod.engine.runtime.engine import build_engine

        model = self.served.model if self.served is not None else None
        try:
            engine = await run_blocking(functools.partial(build_engine, spec, model=model),
                                        timeout=BUILD_TIMEOUT)
        except Exception as exc:
            self.error = f"cannot allocate the KV pool: {exc}"
            self.log.error("%s", self.error)
            raise Unavailable(str(exc)) from None
        finally:
            self._building = None
        if spec != self.settings:  # reconfigured meanwhile (it was idle then)
            engine.close()
            raise Busy("the engine config changed while allocating; retry")
        self.engine, self.error = engine, None
        self.allocations += 1
        self.log.info("KV pool allocated: %d blocks, %.1f MiB on %s (%s, %s)",
                      engine.pool.num_blocks, engine.pool.nbytes / 2**20,
                      engine.backend.name, spec.model, spec.dtype)
        self.ctx.bus.publish("engine.allocated", {"blocks": engine.pool.num_blocks,
                                                  "bytes": engine.pool.nbytes})
        return engine

    def _drop_engine(self, reason: str) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self.engine is not None:
            self.log.info("KV pool released (%s)", reason)
            self.ctx.bus.publish("engine.released", {"reason": reason})
            if self.engine is not self._in_flight:
                self.engine.close()  # else the garbage collector frees it after the step
            self.engine = None
            self.releases += 1

    def _schedule_release(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self.engine is None or self._busy():
            return
        delay = float(self.config.engine.idle_release)
        self._release = asyncio.get_running_loop().call_later(delay, self._release_if_idle)

    def _release_if_idle(self) -> None:
        self._release = None
        if self.engine is not None and not self._busy():
            self._drop_engine(f"idle for {float(self.config.engine.idle_release):g}s")

    # ------------------------------------------------------------------ the step loop

    def _kick(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        empty = 0
        engine = None
        try:
            # self.engine, not a local: a rebuild while a step was in flight continues here.
            while (engine := self.engine) is not None and engine.has_work:
                batch = engine.schedule()
                if batch.is_empty:
                    empty += 1
                    if empty > MAX_EMPTY_STEPS:
                        raise RuntimeError("the scheduler made no progress for "
                                           f"{MAX_EMPTY_STEPS} steps")
                    await asyncio.sleep(0)
                    continue
                empty = 0
                self._in_flight = engine
                result = await self._stepper.run(engine.execute, batch)
                self._in_flight = None  # not on cancellation: the thread may still run
                if engine is self.engine:
                    self._after_step(engine.complete(batch, result))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._in_flight = None
            self.log.exception("engine step failed")
            self.error = f"step failed: {exc}"
            self._fail_bench(self.error)
            self.live.end_all("error", self.error)
            if engine is not None:
                for seq_id in list(engine.tracks):
                    engine.abort(seq_id)
                    self.ctx.bus.publish("engine.finished", {"id": seq_id, "reason": "error",
                                                             "error": str(exc)})
        finally:
            self._driver = None
            self._schedule_release()

    def _after_step(self, outcome: StepOutcome) -> None:
        bus = self.ctx.bus
        now = time.monotonic()
        engine = self.engine
        for seq_id in self.live.on_step(outcome):
            # A stop string or end-of-generation token: abort now, so the sequence is not
            # scheduled again and its blocks free in the next step.
            if engine is not None:
                engine.abort(seq_id)
            bus.publish("engine.finished", {"id": seq_id, "reason": "stop"})
        for request, track in outcome.finished:
            if track is None or track.tag is not None:
                continue
            bus.publish("engine.finished", {
                "id": request.id, "reason": request.reason,
                "output_token_ids": request.output_token_ids,
                "generated": len(request.output_token_ids),
                "prompt_tokens": request.num_prompt_tokens,
                "preemptions": request.num_preemptions, "ttft_s": track.ttft,
                "elapsed_s": (track.last_token or now) - track.submitted})
        bench = self.bench
        if bench is not None:
            bench.on_step(outcome.record, outcome.finished)
            if bench.done or now - self._last_bench_progress >= PROGRESS_INTERVAL:
                self._last_bench_progress = now
                bus.publish("engine.bench.progress", bench.progress())
            if bench.done and self._bench_done is not None and not self._bench_done.done():
                self._bench_done.set_result(None)
        if now - self._last_progress >= PROGRESS_INTERVAL and self.engine is not None:
            live = [t for t in self.engine.tracks.values() if t.tag is None]
            if live:
                self._last_progress = now
                bus.publish("engine.progress", {"requests": [
                    {"id": t.id, "generated": t.generated, "max_new_tokens": t.max_new_tokens}
                    for t in live[:256]]})

    def _fail_bench(self, reason: str) -> None:
        if self._bench_done is not None and not self._bench_done.done():
            self._bench_done.set_exception(Unavailable(f"bench stopped: {reason}"))

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "summary": self._summary()}

    def _summary(self) -> str:
        if not self.config.engine.enabled:
            return "disabled"
        if self.settings is None:
            return "invalid config"
        engine = self.engine
        if engine is None:
            return f"{self.settings.model}: idle, no pool allocated"
        s = engine.scheduler
        return (f"{self.settings.model} on {engine.backend.name}: {s.num_running} running, "
                f"{s.num_waiting} waiting, pool {engine.pool.nbytes / 2**20:.0f} MiB "
                f"({engine.scheduler.block_manager.utilization:.0%} used)")

    # ------------------------------------------------------------------ verbs

    def report(self) -> dict[str, Any]:
        """What ``engine.status`` answers: state, backend, geometry, pool, queue, figures."""
        from velod.engine.settings import SYNTHETIC_KIND as KIND

        engine_config = self.config.engine
        out: dict[str, Any] = {
            "enabled": engine_config.enabled, "state": self._state_word(),
            "error": self.error, "summary": self._summary(),
            "idle_release_s": float(engine_config.idle_release),
            "allocations": self.allocations, "releases": self.releases,
            "bench": self.bench.progress() if self.bench else None,
            "stepping": self._driver is not None,
        }
        if self.engine is not None:
            out.update(self.engine.status())
            out["idle_s"] = time.monotonic() - self.engine.last_active
        elif self.settings is not None:
            out.update({"backend": None, "device": engine_config.device,
                        "model": {"name": "synthetic", "kind": KIND},
                        "geometry": self.settings.geometry_dict(),
                        "dtype": self.settings.dtype,
                        "pool": {"allocated": False, "kv_cache": self.settings.kv_cache_text,
                                 "block_size": self.settings.block_size},
                        "running": 0, "waiting": 0})
        if self.served is not None:
            out["model"] = {**out.get("model", {}), **self.served.describe()}
        out["generations"] = len(self.live)
        return out

    def _state_word(self) -> str:
        if not self.config.engine.enabled:
            return "disabled"
        if self.settings is None:
            return "error"
        if self._building is not None:
            return "allocating"
        if self.engine is None:
            return "released"
        return "busy" if self._busy() else "idle"

    async def submit(self, prompt: list[int] | int, max_new: int, priority: int = 0,
                     seed: int = 0) -> dict[str, Any]:
        """Queue one request: token ids, or a synthetic prompt of that many tokens."""
        engine = await self._ensure_engine()
        limit = engine.geometry.context_length - 1
        if isinstance(prompt, int) and prompt > limit:
            raise InvalidParams(f"parameter 'prompt_length' {prompt} exceeds the {limit} "
                                f"tokens a prompt may have (max context {limit + 1}, one token "
                                "generated)", {"field": "prompt_length", "limit": limit})
        if isinstance(prompt, int):
            from velod.engine.runtime.workload import Workload

            prompt = Workload(requests=1, prompt=prompt, gen=1, seed=seed).prompts()[0]
        seq_id = _submit(engine, prompt, max_new, priority)
        self._kick()
        return {"id": seq_id, "prompt_tokens": len(prompt), "max_new_tokens": max_new,
                "priority": priority}

    async def abort(self, seq_id: int | None) -> dict[str, Any]:
        """Abort request ``seq_id``, or every live request when it is None."""
        everything = seq_id is None
        engine = self.engine
        if not self.config.engine.enabled:
            raise Unavailable("the engine is disabled (engine.enabled: false)")
        if engine is None:
            if everything:
                return {"aborted": []}
            raise NotFound(f"no live request {seq_id}", {"field": "id"})
        ids = list(engine.tracks) if everything else [seq_id]
        bench = self.bench
        if bench is not None and (everything or seq_id in bench.ids):
            ids = list(dict.fromkeys(ids + [i for i in bench.ids if i in engine.tracks]))
            self._fail_bench("aborted by request")
        aborted = [i for i in ids if engine.abort(i)]
        for i in aborted:
            self.live.end(i, "abort")
        if not everything and not aborted:
            raise NotFound(f"no live request {seq_id} (unknown, finished or already "
                           "aborted)", {"field": "id"})
        for i in aborted:
            self.ctx.bus.publish("engine.finished", {"id": i, "reason": "aborted"})
        self._schedule_release()
        return {"aborted": aborted}

    async def run_bench(self, workload: Workload) -> dict[str, Any]:
        """Run ``workload`` through the engine and report what it measured."""
        from velod.engine.runtime.workload import BenchRun

        if self.bench is not None:
            raise Busy("a benchmark is already running; wait for it or abort it (velodctl "
                       "engine abort --all)")
        engine = await self._ensure_engine()
        if self.bench is not None:
            raise Busy("a benchmark is already running")
        _check_workload_fits(engine, workload)
        loop = asyncio.get_running_loop()
        tag = f"bench-{next(self._bench_ids)}"
        prompts = await run_blocking(workload.prompts, timeout=BUILD_TIMEOUT)
        if self.bench is not None:
            raise Busy("a benchmark is already running")
        run = BenchRun(engine, workload, tag, prompts, submit=False)
        self.bench, self._bench_done = run, loop.create_future()
        self._last_bench_progress = time.monotonic()
        self.ctx.bus.publish("engine.bench.progress", run.progress())
        try:
            # In chunks, so thousands of submits never hold the event loop for long.
            while not run.submitted_all and not self._bench_done.done():
                _submit_bench(run, SUBMIT_CHUNK)
                self._kick()
                await asyncio.sleep(0)
            await self._bench_done
            verify = (await run_blocking(run.verify, timeout=BUILD_TIMEOUT)
                      if workload.verify else None)
            return run.result(verify)
        finally:
            if self.bench is run:
                self.bench, self._bench_done = None, None
            self._schedule_release()

    # ------------------------------------------------------------------ language models

    async def load(self, source: str, chat_template: str | None = None) -> dict[str, Any]:
        """Load the model ``source`` (an Ollama name or a GGUF path) in place of any other;
        returns what ``engine status`` says about it. Busy while requests run."""
        from velod.engine.served import load_served

        if not self.config.engine.enabled:
            raise Unavailable("the engine is disabled (engine.enabled: false in the config)")
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            served = self.served
            if served is not None and served.name == source and chat_template is None:
                return served.describe()
            if self._busy():
                raise Busy("the engine is serving requests; load a model when it is idle "
                           "(velodctl engine abort --all stops them)")
            self.log.info("loading model %s", source)
            started = time.monotonic()
            dtype = self.settings.dtype if self.settings is not None else "float32"
            try:
                served = await run_blocking(functools.partial(
                    load_served, source, kv_dtype=dtype, chat_template=chat_template),
                    timeout=LOAD_TIMEOUT)
            except TimeoutError:
                raise Unavailable(f"loading {source} took longer than {LOAD_TIMEOUT:g}s") \
                    from None
            except Exception as exc:
                raise _load_error(source, exc) from None
            if self._busy():  # requests for the old model arrived meanwhile
                raise Busy("the engine took requests while the model loaded; retry")
            self._drop_engine(f"model {source} loaded")
            self.served = served
            self._adopt(self.config)
            self.log.info("model %s loaded in %.1fs", source, time.monotonic() - started)
            self.ctx.bus.publish("engine.model_loaded", {"model": source})
            self._schedule_release()
            return served.describe()

    async def unload(self) -> dict[str, Any]:
        """Drop the loaded model and its KV pool (back to the synthetic workload)."""
        if self.served is None:
            return {"unloaded": None}
        if self._busy():
            raise Busy("the engine is serving requests; unload when it is idle")
        name = self.served.name
        self._drop_engine(f"model {name} unloaded")
        self.served = None
        self._adopt(self.config)
        self.ctx.bus.publish("engine.model_unloaded", {"model": name})
        return {"unloaded": name}

    def model_for(self, name: str | None) -> ServedModel:
        """The loaded model when ``name`` (None: any) means it; NotFound / Unavailable."""
        served = self.served
        if served is None:
            raise Unavailable("no model is loaded; load one with `velodctl engine load "
                              "MODEL` (an Ollama name or a GGUF path)", {"model": name})
        if not served.answers_to(name):
            raise NotFound(f"model {name!r} is not loaded (loaded: {served.name})",
                           {"model": name, "loaded": served.name})
        return served

    async def generate(self, request: GenerationRequest, *,
                       load: bool = False) -> AsyncIterator[Event]:
        """Generate for ``request``: a :class:`TokenEvent` per token, then the
        :class:`GenerationResult`. Concurrent callers share the one scheduler.

        Errors (InvalidParams, NotFound, Unavailable, Busy when the queue is full) come
        from the first ``__anext__``. A caller that stops iterating (closes the iterator,
        is cancelled) aborts its sequence. ``load``: load ``request.model`` if another
        model (or none) is loaded.
        """
        from velod.engine.generation import max_new_tokens, prepare_prompt

        received = time.monotonic()
        if load and request.model and (self.served is None
                                       or not self.served.answers_to(request.model)):
            await self.load(request.model)
        served = self.model_for(request.model)
        params = request.params
        _check(params.check_vocabulary, served.tokenizer.vocab_size)
        if self._prepare_slots is None:
            self._prepare_slots = asyncio.Semaphore(PREPARE_SLOTS)
        async with self._prepare_slots:
            try:
                prompt = await run_blocking(prepare_prompt, request, served,
                                            timeout=PREPARE_TIMEOUT)
            except TimeoutError:
                raise Unavailable(f"preparing the prompt took longer than "
                                  f"{PREPARE_TIMEOUT:g}s") from None
            except Exception as exc:
                raise _request_error(exc) from None
        prepared = time.monotonic()
        engine = await self._ensure_engine()
        if served is not self.served:
            raise Busy("the model changed while the request was prepared; retry")
        max_new = max_new_tokens(params, len(prompt), served.context_length)
        seq_id = _submit(engine, prompt, max_new, request.priority, sampling=params)
        live = LiveGeneration(seq_id, request, served, len(prompt), received, prepared)
        self.live.add(live)
        self._kick()
        try:
            while True:
                event = await live.queue.get()
                yield event
                if event is live.result:
                    return
        finally:
            self.live.discard(seq_id)
            if not live.done:  # the caller went away: free the sequence's blocks
                live.end("abort")
                if self.engine is engine and engine.abort(seq_id):
                    self.ctx.bus.publish("engine.finished", {"id": seq_id, "reason": "aborted"})
                    self._schedule_release()
            self._publish_generation(live)

    def _publish_generation(self, live: LiveGeneration) -> None:
        """``engine.generation``: one finished request's counts and timings (for metrics)."""
        result = live.result
        if result is None:
            return
        self.ctx.bus.publish("engine.generation", {
            "id": live.seq_id, "model": result.model, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "ttft_s": result.timings.ttft_s, "eval_s": result.timings.eval_s})


def _check(check: Any, *args: Any) -> None:
    """Run a request check; its InvalidRequest becomes InvalidParams naming the field."""
    try:
        check(*args)
    except Exception as exc:
        raise _request_error(exc) from None


def _request_error(exc: Exception) -> Exception:
    """A request's own failure (bad field, template, tokens) as the error its caller gets."""
    from velod.engine.core.errors import InvalidRequest
    from velod.engine.models.chat import ChatTemplateError
    from velod.engine.models.tokenizer import TokenizerError

    if isinstance(exc, InvalidRequest):
        return InvalidParams(str(exc), {"field": exc.field, "limit": _plain(exc.limit)})
    if isinstance(exc, (ChatTemplateError, TokenizerError)):
        return InvalidParams(str(exc), {"field": getattr(exc, "field", None)})
    return exc


def _load_error(source: str, exc: Exception) -> Exception:
    """Why a model did not load, as the error the caller gets."""
    from velod.engine.models.chat import ChatTemplateError
    from velod.engine.models.tokenizer import TokenizerError
    from velod.engine.models.weights import NotEnoughMemory
    from velod.model.gguf import ModelFileError
    from velod.model.store import ModelNotFoundError

    if isinstance(exc, ModelNotFoundError):
        return NotFound(str(exc), {"model": source})
    if isinstance(exc, NotEnoughMemory):
        return Unavailable(str(exc), {"model": source})
    if isinstance(exc, (ModelFileError, TokenizerError, ChatTemplateError, ValueError)):
        return InvalidParams(f"cannot load {source}: {exc}", {"field": "model"})
    return exc


def _submit(engine: Engine, prompt: Any, max_new: int, priority: int,
            sampling: Any = None) -> int:
    from velod.engine.core.errors import InvalidRequest, QueueFull

    try:
        return engine.submit(prompt, max_new, priority=priority, sampling=sampling)
    except InvalidRequest as exc:
        raise InvalidParams(str(exc), {"field": exc.field, "limit": _plain(exc.limit)}) from None
    except QueueFull as exc:
        raise Busy(str(exc), {"limit": exc.limit, "value": exc.value}) from None


def _check_workload_fits(engine: Engine, workload: Workload) -> None:
    """Refuse a workload the engine could never hold before building its prompts."""
    context = engine.geometry.context_length
    if workload.prompt >= context:
        raise InvalidParams(f"prompt: {workload.prompt} tokens leave no room to generate in a "
                            f"context of {context}", {"field": "prompt"})
    if workload.prompt + workload.gen > context:
        raise InvalidParams(f"gen: prompt + gen = {workload.prompt + workload.gen} exceeds the "
                            f"context of {context}", {"field": "gen"})
    queue = engine.scheduler.config.max_waiting_tokens
    if workload.requests * workload.prompt > queue:
        raise InvalidParams(f"requests: {workload.requests} x {workload.prompt} prompt tokens "
                            f"exceed the {queue} the queue holds", {"field": "requests"})


def _submit_bench(run: BenchRun, count: int) -> None:
    from velod.engine.core.errors import InvalidRequest, QueueFull

    fields = {"prompt": "prompt", "max_new_tokens": "gen"}
    try:
        run.submit(count)
    except InvalidRequest as exc:
        field = fields.get(exc.field, exc.field)
        raise InvalidParams(f"{field}: {exc}", {"field": field}) from None
    except QueueFull as exc:
        raise Busy(f"{exc} (the workload has {run.workload.requests} requests)",
                   {"limit": exc.limit}) from None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
