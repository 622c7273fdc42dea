"""Benchmarks as the daemon runs them: pick and check the model, record what was measured
under which settings, publish progress, save the result.

Used by the tuner's ``bench_*`` verbs and by its closed loop (verify, explore), which share
one Ollama client and one store. :class:`Benchmarks` gets what it needs — the current
client, the store, a way to publish progress, to read the server's settings and to name the
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
from velod.tuner.backends.ollama import OllamaClient, OllamaError
from velod.tuner.bench.runner import BenchRunner
from velod.tuner.bench.spec import BenchSpec
from velod.tuner.bench.store import BenchStore, new_id

EVENT = "bench.progress"
INTERRUPTED = ("interrupted before the end (the client went away, e.g. Ctrl-C, or velod "
               "stopped); partial results kept")


class Benchmarks:
    """Runs benchmarks through the current client; saves each result in ``store``."""

    def __init__(self, store: BenchStore, client: Callable[[], OllamaClient],
                 publish: Callable[[str, dict[str, Any]], Any],
                 server_settings: Callable[[], Awaitable[dict[str, str]]],
                 most_used: Callable[[list[str]], str | None], log: logging.Logger) -> None:
        self.store = store
        self._client = client
        self._publish = publish
        self._server_settings = server_settings
        self._most_used = most_used
        self.log = log
        self.running: dict[str, Any] | None = None  # id, spec, progress of the current run

    def through(self, client: OllamaClient) -> Benchmarks:
        """The same benchmarks (store, progress) measured through another server's client,
        whose settings are not Ollama's (none are recorded)."""
        async def no_settings() -> dict[str, str]:
            return {}

        return Benchmarks(self.store, lambda: client, self._publish, no_settings,
                          self._most_used, self.log)

    async def installed(self) -> list[dict[str, Any]]:
        """``/api/tags`` entries; Unavailable when Ollama does not answer."""
        try:
            return await self._client().tags()
        except OllamaError as exc:
            raise Unavailable(f"Ollama is not reachable: {exc}") from None

    async def choose_model(self, requested: str | None) -> tuple[str, str | None]:
        """(name, digest) of ``requested``, else of the most-used installed model."""
        tags = await self.installed()
        names = {normalize_name(str(t.get("name") or t.get("model"))): t for t in tags}
        if requested:
            entry = names.get(normalize_name(requested))
            if entry is None:
                listing = ", ".join(sorted(names)) or "none"
                raise NotFound(f"no model {requested!r} in Ollama; installed: "
                                 f"{listing} (or `ollama pull {requested}`)",
                                 {"installed": sorted(names)})
            return normalize_name(requested), entry.get("digest")
        name = self._most_used(list(names))
        if name is None:
            raise NotFound("Ollama has no models installed (ollama pull one, "
                             "e.g. `ollama pull llama3.2:3b`)", {"installed": []})
        return name, names[name].get("digest")

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
        client = self._client()
        try:
            version = await client.version()
        except OllamaError as exc:
            raise Unavailable(f"Ollama is not reachable: {exc}") from None
        settings = await self._server_settings()
        started = time.time()

        def progress(data: dict[str, Any]) -> None:
            if self.running is not None:
                self.running["progress"] = data
            self._publish(EVENT, data)

        runner = BenchRunner(client, spec, run_id, progress)
        record = {"id": run_id, "time": started, "spec": spec.to_dict(),
                  "ollama": {"url": client.base_url, "version": version},
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
        result = {**record, "loaded": await self._loaded(client, spec.model), **measured}
        await self._save(result, runner, progress)
        return result

    async def _loaded(self, client: OllamaClient, model: str) -> dict[str, Any] | None:
        """How ``model`` sits in memory now (``/api/ps``); None when it is not loaded."""
        try:
            for m in await client.loaded():
                if normalize_name(m.name) == normalize_name(model):
                    return {"size": m.size, "size_vram": m.size_vram,
                            "context_length": m.context_length,
                            "gpu_percent": round(100 * m.gpu_fraction, 1)}
        except OllamaError:
            pass  # Ollama died mid-run: the measured part and its error are what matter
        return None

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
