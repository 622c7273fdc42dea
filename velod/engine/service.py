"""The engine as a daemon service: a language model, a lazy KV pool, a step loop that runs
only with work, and the verbs.

``engine.model`` names a language model (an Ollama name or a .gguf path) or a synthetic
preset. A language model is loaded when the daemon starts (and on a reload that names
another one) in a worker thread bounded by ``LOAD_TIMEOUT``, never blocking the event loop:
its memory is estimated first (weights plus a fixed engine.kv_cache) and refused with the
figures; its tokenizer and chat template are built with it (:class:`ServedModel`). A model
that cannot load (missing, truncated, unsupported, too large) leaves the component degraded
with the error in status; the daemon carries on. ``load(model, chat_template)`` switches to
another model (the old one stays if the new one fails; the choice is kept until the config's
engine.model changes) and ``unload()`` drops it until the next ``load``. The weights stay
loaded while the daemon runs; the KV pool is allocated on the first request and freed after
``engine.idle_release`` without work.

While requests are live one task steps the engine: scheduling on the event loop (a few
milliseconds at most), the device work of each step on one worker thread, so the control
socket keeps answering during long steps. With no work there is no task and no timer but the
idle-release one: zero CPU. ``submit`` queues token ids with per-request listeners (each
token with its log-probability, then the end); ``generate`` is the text layer on top
(``velod.engine.generation``: tokenize or render the chat off the loop, stream text, stop
strings, finish reasons, timings). The verbs are what ``velod.engine.rpc`` and the HTTP
APIs call; a config change reaches the engine through ``reconfigure``, which derives
:class:`EngineSettings` once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from velod.blocking import SerialWorker, run_blocking
from velod.component import Component, Context, ReconfigureRefused
from velod.errors import Busy, InvalidParams, NotFound, Unavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from velod.config import Config
    from velod.engine.core.sequence import FinishedRequest
    from velod.engine.generation import GenerationRequest
    from velod.engine.live import Event, LiveGeneration
    from velod.engine.models.sampling import SamplingParams
    from velod.engine.runtime.engine import Engine, Sampled, StepOutcome
    from velod.engine.runtime.workload import BenchRun, Workload
    from velod.engine.served import ServedModel
    from velod.engine.settings import EngineSettings

BUILD_TIMEOUT = 300.0  # allocating a large pool or compiling CUDA kernels the first time
LOAD_TIMEOUT = 600.0  # reading and dequantizing a multi-GB GGUF
PREPARE_TIMEOUT = 10.0  # rendering and tokenizing one prompt (both bounded in size)
PREPARE_SLOTS = 2  # prompts prepared at once: the step's worker thread is never starved
PROGRESS_INTERVAL = 0.25
MAX_EMPTY_STEPS = 1000
SUBMIT_CHUNK = 128


class EngineService(Component):
    """Component ``engine``: owns the model and the engine, steps it while there is work,
    answers verbs."""

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
        self._served_key: tuple[Any, ...] | None = None  # the settings it was loaded for
        self._override: str | None = None  # engine.model chosen by load(), not the config
        self._chat_template: str | None = None  # load()'s chat-template override
        self._unloaded = False  # unload() asked: no background load until the next choice
        self._loading: asyncio.Task[ServedModel] | None = None
        self._load_lock: asyncio.Lock | None = None
        self._prepare_slots: asyncio.Semaphore | None = None
        # Per request: who hears of each token and of the end (see submit()).
        self._listeners: dict[int, Listener] = {}
        self._generations: dict[int, LiveGeneration] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._adopt(self.config)
        if self.settings_error is None:  # else _adopt left it degraded, with the error
            self.state = "running" if self.config.engine.enabled else "stopped"
            self._load_in_background()

    async def stop(self) -> None:
        self.state = "stopping"
        if self._driver is not None:
            self._driver.cancel()
        if self._loading is not None:
            self._loading.cancel()
        self._fail_bench("velod is stopping")
        for seq_id in list(self._listeners):
            self._end_listener(seq_id, "aborted", "velod is stopping")
        self._drop_engine("stopping")
        self._drop_model("stopping")
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        from velod.engine.core.errors import EngineConfigError
        from velod.engine.settings import EngineSettings

        new = config.engine
        try:
            spec = EngineSettings.from_config(new) if new.enabled else None
        except EngineConfigError as exc:
            raise ReconfigureRefused(str(exc)) from None
        # A model chosen by load() stays until the config names another one.
        same_model = new.model == self.config.engine.model
        override = self._override if same_model else None
        if override is not None and spec is not None:
            spec = self._with_model(spec, override)
        served = self.served
        keep = (served is not None and spec is not None and spec.model == served.name
                and _load_key(spec) == self._served_key)
        if keep and spec is not None and served is not None:
            spec = spec.with_model(served.geometry, f"GGUF {served.path}")
        if (spec != self.settings or (not keep and served is not None)) and self._busy():
            engine = self.engine
            load = (f"{engine.scheduler.num_running} running, {engine.scheduler.num_waiting} "
                    "waiting" if engine else "building its pool")
            raise ReconfigureRefused(
                f"the engine is busy ({load}); its new model/geometry/pool settings were not "
                "applied: run `velodctl reload` again once it is idle")
        if spec != self.settings:
            self._drop_engine("config changed")
        if not keep:
            self._drop_model("config changed")
        self._override = override
        if not same_model:
            self._chat_template, self._unloaded = None, False
        self._adopt(config)
        self.state = "running" if new.enabled else "stopped"
        self._schedule_release()
        self._load_in_background()

    def _adopt(self, config: Config) -> None:
        """Take ``config``: the settings it derives, with the chosen model's shape once that
        model is loaded."""
        from velod.engine.core.errors import EngineConfigError
        from velod.engine.settings import EngineSettings

        self.config = config
        self.settings, self.settings_error, self.error = None, None, None
        if not config.engine.enabled:
            return
        try:
            settings = EngineSettings.from_config(config.engine)
        except EngineConfigError as exc:
            self.settings_error = str(exc)
            self.error = self.settings_error
            self.state = "degraded"
            return
        if self._override is not None:
            settings = self._with_model(settings, self._override)
        served = self.served
        if served is not None and served.name == settings.model:
            settings = settings.with_model(served.geometry, f"GGUF {served.path}")
        self.settings = settings

    @staticmethod
    def _with_model(settings: EngineSettings, model: str) -> EngineSettings:
        """``settings`` running ``model`` (checked as engine.model is) instead."""
        import dataclasses

        from velod.engine.settings import is_model_reference, preset_geometry

        if is_model_reference(model):
            return dataclasses.replace(settings, geometry=None, model=model, source="",
                                       language_model=True)
        geometry, source = preset_geometry(model)
        return dataclasses.replace(settings, geometry=geometry, model=model, source=source,
                                   language_model=False)

    def _busy(self) -> bool:
        if self._building is not None or self.bench is not None:
            return True
        return self.engine is not None and self.engine.has_work

    # ------------------------------------------------------------------ the model

    def _load_in_background(self) -> None:
        """Start loading the language model the settings name, unless it is loaded or
        loading; its failure is the component's error (degraded), never the daemon's."""
        settings = self.settings
        if (settings is None or not settings.language_model or self.served is not None
                or self._loading is not None or self._unloaded):
            return
        self._loading = asyncio.ensure_future(self._load(settings.model, self._chat_template,
                                                         background=True))
        # Retrieved here, so a load no request waited for never logs "never retrieved".
        self._loading.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _load(self, source: str, chat_template: str | None, *,
                    background: bool = False) -> ServedModel:
        """Load ``source`` in a worker thread and make it the engine's model; the previous
        one stays when this one fails. Errors as the caller gets them (NotFound,
        InvalidParams, Unavailable, Busy)."""
        from velod.engine.served import load_served

        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        stale = False
        try:
            async with self._load_lock:
                if self.settings is None:
                    raise Unavailable(f"the engine config is invalid: {self.settings_error}")
                settings = self._with_model(self.settings, source)
                self.log.info("loading model %s", source)
                started = time.monotonic()
                try:
                    served = await run_blocking(functools.partial(
                        load_served, settings, chat_template=chat_template),
                        timeout=LOAD_TIMEOUT)
                except Exception as exc:
                    timeout = isinstance(exc, TimeoutError)
                    reason = f"took longer than {LOAD_TIMEOUT:g}s" if timeout else str(exc)
                    if background or self.served is None:
                        self.error = f"cannot load {source}: {reason}"
                        self.state = "degraded"
                    self.log.warning("cannot load model %s: %s", source, reason)
                    raise (Unavailable(f"cannot load {source}: {reason}") if timeout
                           else _load_error(source, exc)) from None
                wanted = self.settings.model if self.settings is not None else None
                if background and wanted != source:
                    stale = True  # the config named another model meanwhile: load that
                    raise Busy(f"the config named another model while {source} loaded")
                if self._busy():  # requests for the old model arrived meanwhile
                    raise Busy("the engine took requests while the model loaded; retry")
                self._drop_engine(f"model {source} loaded")
                self._drop_model(f"model {source} loaded")
                self.served, self._served_key = served, _load_key(settings)
                if not background:
                    self._override = None if source == self.config.engine.model else source
                    self._chat_template, self._unloaded = chat_template, False
                self._adopt(self.config)
                self.state = "running"
                self.log.info("model %s loaded in %.1fs", source, time.monotonic() - started)
                self.ctx.bus.publish("engine.model_loaded", {"model": source})
                return served
        finally:
            if background:
                self._loading = None
                if stale:
                    self._load_in_background()

    def _drop_model(self, reason: str) -> None:
        if self.served is not None:
            name = self.served.name
            self.log.info("model %s unloaded (%s)", name, reason)
            self.served, self._served_key = None, None
            self.ctx.bus.publish("engine.model_unloaded", {"model": name, "reason": reason})

    async def _ready_model(self) -> ServedModel:
        """The language model the settings name, once loaded (waiting for a load under
        way); Unavailable saying why there is none."""
        await self._ready_model_quietly()
        served = self.served
        if served is None:
            raise Unavailable(self.error or "no model is loaded; load one with `velodctl "
                              "engine load MODEL` (an Ollama name or a GGUF path)")
        return served

    async def _ready_model_quietly(self) -> None:
        """Wait for a load under way, if any (its error, if it fails, is in self.error)."""
        while (loading := self._loading) is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(loading)
            if self._loading is loading:
                return

    async def load(self, model: str | None = None,
                   chat_template: str | None = None) -> dict[str, Any]:
        """Load ``model`` (an Ollama name, a .gguf path or a synthetic preset; None: the one
        configured) with its KV pool, in place of any other; returns what ``engine.status``
        says of it. ``chat_template`` (a built-in's name or a Jinja file) replaces the
        file's. Busy while requests run; InvalidParams for a name that is none of those or
        a file that is not a usable model, NotFound for a missing one, Unavailable (not
        enough memory, with the figures): the model loaded before stays.
        """
        from velod.engine.core.errors import EngineConfigError

        if not self.config.engine.enabled:
            raise Unavailable("the engine is disabled (engine.enabled: false in the config)",
                              {"enabled": False})
        if self.settings is None:
            raise Unavailable(f"the engine config is invalid: {self.settings_error}")
        if self._busy():
            raise Busy("the engine is serving requests; load a model when it is idle "
                       "(velodctl engine abort --all stops them)")
        wanted = self.config.engine.model if model is None else model
        if self._loading is not None:  # the configured model, loading: it may be this one
            await self._ready_model_quietly()
        try:
            settings = self._with_model(self.settings, wanted)
        except EngineConfigError as exc:
            raise InvalidParams(f"model: {exc.reason}", {"field": "model"}) from None
        if settings.language_model:
            served = self.served
            if (served is None or served.name != wanted or chat_template is not None
                    or _load_key(settings) != self._served_key):
                await self._load(wanted, chat_template)
        else:  # a synthetic preset: no weights
            self._drop_engine(f"switching to {wanted}")
            self._drop_model(f"switching to {wanted}")
            self._override = None if wanted == self.config.engine.model else wanted
            self._unloaded = False
            self._adopt(self.config)
            self.state = "running"
        await self._ensure_engine()
        self._schedule_release()
        report = self.report()
        return {"model": report.get("model"), "pool": report.get("pool"),
                "geometry": report.get("geometry"), "backend": report.get("backend")}

    async def unload(self) -> dict[str, Any]:
        """Free the model's weights and the KV pool now (until the next ``load``, or a
        reload of a config that names another model); Busy while requests run."""
        if self._busy():
            raise Busy("the engine is serving requests; unload when it is idle")
        name = self.served.name if self.served is not None else None
        self._drop_engine("unloaded by request")
        self._drop_model("unloaded by request")
        self._unloaded = True
        if self.settings is not None and self.settings.geometry is not None \
                and self.settings.language_model:
            self._adopt(self.config)  # the shape goes with the model
        return {"unloaded": name is not None, "model": name}

    def model_for(self, name: str | None) -> ServedModel:
        """The loaded model when ``name`` (None: any) means it; NotFound / Unavailable."""
        served = self.served
        if served is None:
            raise Unavailable(self.error or "no model is loaded; load one with `velodctl "
                              "engine load MODEL` (an Ollama name or a GGUF path)",
                              {"model": name})
        if not served.answers_to(name):
            raise NotFound(f"model {name!r} is not loaded (loaded: {served.name})",
                           {"model": name, "loaded": served.name})
        return served

    # ------------------------------------------------------------------ the pool

    async def _ensure_engine(self) -> Engine:
        if not self.config.engine.enabled:
            raise Unavailable("the engine is disabled (engine.enabled: false in the config)",
                              {"enabled": False})
        if self.settings is None:
            raise Unavailable(f"the engine config is invalid: {self.settings_error}")
        if self.engine is not None:
            return self.engine
        served = await self._ready_model() if self.settings.language_model else None
        if self.engine is not None:
            return self.engine
        if self._building is None:
            self._building = asyncio.ensure_future(self._build(self.settings, served))
        try:
            # Every caller waits for the same build; the build itself adopts the engine, so
            # no waiter can run before it is in place.
            return await asyncio.shield(self._building)
        except (Busy, Unavailable):
            raise
        except Exception as exc:  # the build logged it
            raise Unavailable(str(exc)) from None

    async def _build(self, spec: EngineSettings, served: ServedModel | None) -> Engine:
        """Build the engine for ``spec`` (running ``served``) in a worker thread, adopt it."""
        from velod.engine.runtime.engine import build_engine

        model = served.model if served is not None else None
        try:
            engine = await run_blocking(functools.partial(build_engine, spec, model=model),
                                        timeout=BUILD_TIMEOUT)
        except Exception as exc:
            self.error = f"cannot allocate the KV pool: {exc}"
            self.log.error("%s", self.error)
            raise Unavailable(self.error) from None
        finally:
            self._building = None
        if spec != self.settings or served is not self.served:  # changed meanwhile (idle)
            engine.close()
            raise Busy("the engine config or model changed while allocating; retry")
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
            if engine is not None:
                for seq_id in list(engine.tracks):
                    engine.abort(seq_id)
                    self.ctx.bus.publish("engine.finished", {"id": seq_id, "reason": "error",
                                                             "error": str(exc)})
                    self._end_listener(seq_id, "error", self.error)
        finally:
            self._driver = None
            self._schedule_release()

    def _after_step(self, outcome: StepOutcome) -> None:
        bus = self.ctx.bus
        now = time.monotonic()
        listeners = self._listeners
        if listeners:
            for token in outcome.sampled:
                listener = listeners.get(token.id)
                if listener is not None and listener.token(token):
                    self._stop_early(token.id)
            for request, _ in outcome.finished:
                listener = listeners.pop(request.id, None)
                if listener is not None:
                    listener.finish(request)
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
        name = self.settings.model
        if self._loading is not None:
            return f"{name}: loading"
        if self.settings.language_model and self.served is None:
            return f"{name}: not loaded" + (" (see error)" if self.error else "")
        engine = self.engine
        if engine is None:
            return f"{name}: idle, no pool allocated"
        s = engine.scheduler
        return (f"{name} on {engine.backend.name}: {s.num_running} running, "
                f"{s.num_waiting} waiting, pool {engine.pool.nbytes / 2**20:.0f} MiB "
                f"({engine.scheduler.block_manager.utilization:.0%} used)")

    # ------------------------------------------------------------------ verbs

    def report(self) -> dict[str, Any]:
        """What ``engine.status`` answers: state, model, backend, geometry, pool, queue,
        figures."""
        from velod.engine.settings import SYNTHETIC_KIND as KIND

        engine_config = self.config.engine
        out: dict[str, Any] = {
            "enabled": engine_config.enabled, "state": self._state_word(),
            "error": self.error, "summary": self._summary(),
            "idle_release_s": float(engine_config.idle_release),
            "allocations": self.allocations, "releases": self.releases,
            "bench": self.bench.progress() if self.bench else None,
            "stepping": self._driver is not None,
            "generations": len(self._generations),
        }
        settings, served = self.settings, self.served
        if self.engine is not None:
            out.update(self.engine.status())
            out["idle_s"] = time.monotonic() - self.engine.last_active
        elif settings is not None:
            if served is not None:
                model = {**served.model.describe(), "synthetic": False}
            elif settings.language_model:
                model = {"name": settings.model, "kind": "language model (GGUF)",
                         "synthetic": False}
            else:
                model = {"name": settings.model, "kind": KIND, "synthetic": True}
            out.update({"backend": None, "device": engine_config.device, "model": model,
                        "geometry": settings.geometry_dict(), "dtype": settings.dtype,
                        "pool": {"allocated": False, "kv_cache": settings.kv_cache_text,
                                 "block_size": settings.block_size},
                        "running": 0, "waiting": 0})
        if settings is not None and settings.language_model:
            out["model"] = {**out.get("model", {}), "loaded": served is not None,
                            "loading": self._loading is not None,
                            **(served.describe() if served is not None else {})}
        return out

    def _state_word(self) -> str:
        if not self.config.engine.enabled:
            return "disabled"
        if self.settings is None:
            return "error"
        if self._loading is not None:
            return "loading"
        if self.settings.language_model and self.served is None:
            return "no model"
        if self._building is not None:
            return "allocating"
        if self.engine is None:
            return "released"
        return "busy" if self._busy() else "idle"

    async def submit(self, prompt: list[int] | int, max_new: int, priority: int = 0,
                     seed: int = 0, *, sampling: SamplingParams | None = None,
                     on_token: Callable[[Sampled], bool | None] | None = None,
                     on_finish: Callable[[FinishedRequest], None] | None = None
                     ) -> dict[str, Any]:
        """Queue one request: token ids, or a synthetic prompt of that many tokens.

        ``sampling`` picks its tokens (None: greedy; a language model only). ``on_token`` is
        called on the event loop with each new token (``Sampled``: id, token, log-probability
        where asked) and returns True to end the request there (reason "stop": a stop
        string; its blocks free in the next step); ``on_finish`` once at the end with the
        ``FinishedRequest`` (reason "length", "stop", "aborted" or "error"). Neither may
        block. InvalidParams for a prompt or option the model cannot take, Busy when the
        queue is full, Unavailable when no model can run.
        """
        engine = await self._ensure_engine()
        limit = engine.geometry.context_length - 1
        if isinstance(prompt, int) and prompt > limit:
            raise InvalidParams(f"parameter 'prompt_length' {prompt} exceeds the {limit} "
                                f"tokens a prompt may have (max context {limit + 1}, one token "
                                "generated)", {"field": "prompt_length", "limit": limit})
        if isinstance(prompt, int):
            from velod.engine.runtime.workload import Workload

            prompt = Workload(requests=1, prompt=prompt, gen=1, seed=seed).prompts(
                engine.model.vocab_size)[0]
        seq_id = _submit(engine, prompt, max_new, priority, sampling)
        if on_token is not None or on_finish is not None:
            self._listeners[seq_id] = Listener(on_token, on_finish)
        self._kick()
        return {"id": seq_id, "prompt_tokens": len(prompt), "max_new_tokens": max_new,
                "priority": priority}

    def _end_listener(self, seq_id: int, reason: str, error: str | None = None) -> None:
        """Tell a request's listener it ended outside a step (aborted, stopped, failed)."""
        listener = self._listeners.pop(seq_id, None)
        if listener is not None:
            from velod.engine.core.sequence import FinishedRequest

            listener.finish(FinishedRequest(seq_id, reason, [], 0, 0, error))

    def _stop_early(self, seq_id: int) -> None:
        """End a request its listener stopped (a stop string): aborted in the engine now,
        so it is not scheduled again and its blocks free in the next step."""
        engine = self.engine
        if engine is not None and engine.abort(seq_id):
            self.ctx.bus.publish("engine.finished", {"id": seq_id, "reason": "stop"})
        self._end_listener(seq_id, "stop")

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
        from velod.engine.live import LiveGeneration

        received = time.monotonic()
        if load and request.model and (self.served is None
                                       or not self.served.answers_to(request.model)):
            await self.load(request.model)
        if self.served is None and self._loading is not None:
            await self._ready_model()  # the configured model, still loading
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
        live = LiveGeneration(request, served, len(prompt), received, prepared)
        reply = await self.submit(prompt, max_new_tokens(params, len(prompt),
                                                         served.context_length),
                                  request.priority, sampling=params, on_token=live.on_token,
                                  on_finish=live.on_finish)
        seq_id = live.seq_id = reply["id"]
        self._generations[seq_id] = live
        try:
            while True:
                event = await live.queue.get()
                yield event
                if event is live.result:
                    return
        finally:
            self._generations.pop(seq_id, None)
            if not live.done:  # the caller went away: free the sequence's blocks
                live.end("aborted")
                self._listeners.pop(seq_id, None)
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
        if not everything and not aborted:
            raise NotFound(f"no live request {seq_id} (unknown, finished or already "
                           "aborted)", {"field": "id"})
        for i in aborted:
            self.ctx.bus.publish("engine.finished", {"id": i, "reason": "aborted"})
            self._end_listener(i, "aborted")
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
        if workload.verify and engine.language:
            raise InvalidParams("verify: the dense recomputation checks the synthetic model; "
                                "a language model is checked against llama.cpp by the tests",
                                {"field": "verify"})
        loop = asyncio.get_running_loop()
        tag = f"bench-{next(self._bench_ids)}"
        prompts = await run_blocking(workload.prompts, engine.model.vocab_size,
                                     timeout=BUILD_TIMEOUT)
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


class Listener:
    """One request's callbacks (see ``EngineService.submit``); a failing callback is logged
    and dropped, never allowed to stop the step loop."""

    def __init__(self, on_token: Callable[[Sampled], bool | None] | None,
                 on_finish: Callable[[FinishedRequest], None] | None) -> None:
        self.on_token, self.on_finish = on_token, on_finish

    def token(self, token: Sampled) -> bool:
        """True when the listener ends its request with this token."""
        if self.on_token is not None:
            try:
                return bool(self.on_token(token))
            except Exception:
                logging.getLogger("velod.engine").exception("a token listener failed")
                self.on_token = None
        return False

    def finish(self, request: FinishedRequest) -> None:
        if self.on_finish is not None:
            try:
                self.on_finish(request)
            except Exception:
                logging.getLogger("velod.engine").exception("a finish listener failed")


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
    from velod.engine.core.errors import EngineError
    from velod.model.store import ModelNotFoundError

    if isinstance(exc, ModelNotFoundError):
        return NotFound(str(exc), {"model": source})
    if isinstance(exc, ValueError):  # the file: not a GGUF, truncated, unsupported, template
        return InvalidParams(f"cannot load {source}: {exc}", {"field": "model"})
    if isinstance(exc, EngineError):  # not enough memory (with the figures), no device
        return Unavailable(f"cannot load {source}: {exc}", {"model": source})
    return exc


def _submit(engine: Engine, prompt: Any, max_new: int, priority: int,
            sampling: SamplingParams | None = None) -> int:
    from velod.engine.core.errors import InvalidRequest, QueueFull

    try:
        return engine.submit(prompt, max_new, sampling=sampling, priority=priority)
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


def _load_key(settings: EngineSettings) -> tuple[Any, ...]:
    """What a loaded model depends on besides its name: the cache's element type, the
    device, and the step sizes the CUDA runner allocates for."""
    return (settings.model, settings.dtype, settings.device, settings.block_size,
            settings.max_batch_size, settings.max_tokens_per_step)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
