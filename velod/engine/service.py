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
import itertools
import time
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.component import Component, Context, ReconfigureRefused
from velod.errors import Busy, InvalidParams, NotFound, Unavailable

if TYPE_CHECKING:
    from velod.config import Config
    from velod.engine.runtime.engine import Engine, StepOutcome
    from velod.engine.runtime.workload import BenchRun, Workload
    from velod.engine.settings import EngineSettings

BUILD_TIMEOUT = 300.0  # allocating a large pool or compiling CUDA kernels the first time
PROGRESS_INTERVAL = 0.25
MAX_EMPTY_STEPS = 1000
SUBMIT_CHUNK = 128


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
        self._drop_engine("stopping")
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        from velod.engine.core.errors import EngineConfigError
        from velod.engine.settings import EngineSettings

        new = config.engine
        try:
            spec = EngineSettings.from_config(new) if new.enabled else None
        except EngineConfigError as exc:
            raise ReconfigureRefused(str(exc)) from None
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
        from velod.engine.settings import EngineSettings

        self.config = config
        self.settings, self.settings_error, self.error = None, None, None
        if not config.engine.enabled:
            return
        try:
            self.settings = EngineSettings.from_config(config.engine)
        except EngineConfigError as exc:
            self.settings_error = str(exc)
            self.error = self.settings_error
            self.state = "degraded"

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
            from velod.engine.runtime.engine import build_engine

            spec = self.settings
            self._building = asyncio.ensure_future(
                run_blocking(build_engine, spec, timeout=BUILD_TIMEOUT))
            try:
                engine = await asyncio.shield(self._building)
            except Exception as exc:
                self.error = f"cannot allocate the KV pool: {exc}"
                self.log.error("%s", self.error)
                raise Unavailable(str(exc)) from None
            finally:
                self._building = None
            if spec != self.settings:  # reconfigured meanwhile (it was idle then)
                raise Busy("the engine config changed while allocating; retry")
            self.engine, self.error = engine, None
            self.allocations += 1
            self.log.info("KV pool allocated: %d blocks, %.1f MiB on %s (%s, %s)",
                          engine.pool.num_blocks, engine.pool.nbytes / 2**20,
                          engine.backend.name, spec.model, spec.dtype)
            self.ctx.bus.publish("engine.allocated", {"blocks": engine.pool.num_blocks,
                                                      "bytes": engine.pool.nbytes})
            return engine
        try:
            await asyncio.shield(self._building)
        except Exception as exc:  # the first caller logged it
            raise Unavailable(str(exc)) from None
        if self.engine is None:
            raise Unavailable(self.error or "the KV pool could not be allocated")
        return self.engine

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
                result = await run_blocking(engine.execute, batch)
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
        finally:
            self._driver = None
            self._schedule_release()

    def _after_step(self, outcome: StepOutcome) -> None:
        bus = self.ctx.bus
        now = time.monotonic()
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


def _submit(engine: Engine, prompt: Any, max_new: int, priority: int) -> int:
    from velod.engine.core.errors import InvalidRequest, QueueFull

    try:
        return engine.submit(prompt, max_new, priority=priority)
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
