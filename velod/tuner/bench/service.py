"""Benchmarks as the daemon runs them: pick and check the model, record what was measured
under which settings, publish progress, save the result.

Used by a server's tuner's ``bench_*`` verbs and by its closed loop (verify, explore), which
share one backend and one store. :class:`Benchmarks` gets what it needs — the current
backend, the store, a way to publish progress, to read the server's settings and to name the
most-used model — not the tuner. The caller holds the tuner's lock, so that no restart
happens while a benchmark runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from velod.blocking import run_blocking
from velod.errors import Busy, NotFound, Unavailable
from velod.model.names import normalize_name
from velod.tuner.backends.base import Backend, ServerError
from velod.tuner.bench.runner import BenchRunner
from velod.tuner.bench.spec import BenchSpec
from velod.tuner.bench.store import BenchStore, new_id

EVENT = "bench.progress"
INTERRUPTED = ("interrupted before the end (the client went away, e.g. Ctrl-C, or velod "
               "stopped); partial results kept")


class Benchmarks:
    """Runs benchmarks through the current backend; saves each result in ``store``."""

    def __init__(self, store: BenchStore, backend: Callable[[], Backend],
                 publish: Callable[[str, dict[str, Any]], Any],
                 server_settings: Callable[[], Awaitable[dict[str, str]]],
                 most_used: Callable[[list[str]], str | None], log: logging.Logger) -> None:
        self.store = store
        self._backend = backend
        self._publish = publish
        self._server_settings = server_settings
        self._most_used = most_used
        self.log = log
        self.running: dict[str, Any] | None = None  # id, spec, progress of the current run

    def through(self, backend: Backend) -> Benchmarks:
        """The same benchmarks (store, progress) measured through another server's backend,
        whose settings velod does not manage (none are recorded)."""
        async def no_settings() -> dict[str, str]:
            return {}

        return Benchmarks(self.store, lambda: backend, self._publish, no_settings,
                          self._most_used, self.log)

    async def installed(self) -> list[tuple[str, str | None]]:
        """(name, digest) of the models the server can run; Unavailable when it does not
        answer."""
        backend = self._backend()
        try:
            return await backend.bench_models()
        except ServerError as exc:
            raise Unavailable(f"{backend.label} is not reachable: {exc}") from None

    async def choose_model(self, requested: str | None) -> tuple[str, str | None]:
        """(name, digest) of ``requested``, else of the most-used installed model."""
        label = self._backend().label
        # By Ollama's naming (``x`` = ``x:latest``), kept as the server spells it.
        names = {normalize_name(n): (n, digest) for n, digest in await self.installed()}
        if requested:
            if normalize_name(requested) not in names:
                listing = ", ".join(sorted(n for n, _ in names.values())) or "none"
                hint = f" (or `ollama pull {requested}`)" if label == "Ollama" else ""
                raise NotFound(f"no model {requested!r} in {label}; installed: "
                               f"{listing}{hint}", {"installed": sorted(names)})
            return names[normalize_name(requested)]
        name = self._most_used(list(names))
        if name is None:
            raise NotFound(f"{label} has no models installed (for Ollama: ollama pull one, "
                           "e.g. `ollama pull llama3.2:3b`)", {"installed": []})
        return names[normalize_name(name)]

    async def run(self, spec: BenchSpec, digest: str | None) -> dict[str, Any]:
        """Measure ``spec`` and save the result (complete or partial); returns it."""
        if self.running is not None:
            raise Busy(f"benchmark {self.running['id']} is running; wait for it")
        run_id = new_id()
        self.running = {"id": run_id, "spec": spec.to_dict(), "progress": None}
        try:
            return await self._run(run_id, spec, digest)
        finally:
            self.running = None

    async def _run(self, run_id: str, spec: BenchSpec, digest: str | None) -> dict[str, Any]:
        backend = self._backend()
        try:
            version = await backend.ready()
        except ServerError as exc:
            raise Unavailable(f"{backend.label} is not reachable: {exc}") from None
        settings = await self._server_settings()
        started = time.time()

        def progress(data: dict[str, Any]) -> None:
            if self.running is not None:
                self.running["progress"] = data
            self._publish(EVENT, data)

        runner = BenchRunner(backend, spec, run_id, progress)
        record = {"id": run_id, "time": started, "spec": spec.to_dict(),
                  "server": {"name": backend.name, "kind": backend.kind, "url": backend.url,
                             "version": version},
                  "model": {"name": spec.model, "digest": digest},
                  "server_settings": settings, "loaded": None}
        try:
            measured = await runner.run()
        except asyncio.CancelledError:
            # The caller went away (Ctrl-C in velodctl closes its connection, which cancels
            # the call) or velod is stopping: keep what was measured, then stop.
            result = {**record, **runner.results("interrupted", INTERRUPTED)}
            await self._save(result, runner, progress)
            raise
        result = {**record, "loaded": await self._loaded(backend, spec.model), **measured}
        await self._save(result, runner, progress)
        return result

    @staticmethod
    async def _loaded(backend: Backend, model: str) -> dict[str, Any] | None:
        """How ``model`` sits in memory now (the backend's view); None when unknown."""
        try:
            return await backend.loaded_info(model)
        except ServerError:
            return None  # it died mid-run: the measured part and its error are what matter

    async def _save(self, result: dict[str, Any], runner: BenchRunner,
                    progress: Callable[[dict[str, Any]], None]) -> None:
        """Save ``result`` (adding its path or the save error), then announce the end."""
        try:
            path = await run_blocking(self.store.save, result, timeout=10)
            result["path"] = str(path)
        except (OSError, TimeoutError) as exc:
            self.log.error("cannot save benchmark %s: %s", result["id"], exc)
            result["save_error"] = str(exc)
        total = runner.spec.requests
        if result["error_kind"] == "interrupted":
            self.log.info("benchmark %s interrupted after %d of %d requests; what was "
                          "measured is saved", result["id"], runner.done, total)
        progress({"id": result["id"], "phase": "finished", "done": runner.done,
                  "total": total, "complete": result["complete"], "error": result["error"],
                  "error_kind": result["error_kind"]})
