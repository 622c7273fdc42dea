"""Benchmarks as the daemon runs them: pick and check the model, record what was measured
under which settings, publish progress, save the result.

Used by the ``bench.*`` control methods and by the tuner's closed loop (verify, explore),
which share one Ollama client and one store. The caller holds the tuner's lock, so that no
restart happens while a benchmark runs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.ollama.bench_runner import BenchRunner
from velod.ollama.bench_store import BenchStore, new_id
from velod.ollama.benchmark import BenchSpec
from velod.ollama.client import OllamaError
from velod.ollama.models import normalize_name

if TYPE_CHECKING:
    from velod.ollama.tuner import Tuner

EVENT = "bench.progress"


class BenchError(Exception):
    """A benchmark that could not start; ``code`` is the RPC error code to answer with."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class Benchmarks:
    """Runs benchmarks for one tuner (its client, state dir, history of model use)."""

    def __init__(self, tuner: Tuner) -> None:
        self.t = tuner
        self.store = BenchStore(tuner.ctx.state_dir)
        self.running: dict[str, Any] | None = None  # id, spec, progress of the current run

    async def installed(self) -> list[dict[str, Any]]:
        """``/api/tags`` entries; BenchError(unavailable) when Ollama does not answer."""
        try:
            return await self.t.client.tags()
        except OllamaError as exc:
            raise BenchError("unavailable", f"Ollama is not reachable: {exc}") from None

    async def choose_model(self, requested: str | None) -> tuple[str, str | None]:
        """(name, digest) of ``requested``, else of the most-used installed model."""
        tags = await self.installed()
        names = {normalize_name(str(t.get("name") or t.get("model"))): t for t in tags}
        if requested:
            entry = names.get(normalize_name(requested))
            if entry is None:
                listing = ", ".join(sorted(names)) or "none"
                raise BenchError("not_found", f"no model {requested!r} in Ollama; installed: "
                                 f"{listing} (or `ollama pull {requested}`)",
                                 {"installed": sorted(names)})
            return normalize_name(requested), entry.get("digest")
        name = self.t.most_used_model(list(names))
        if name is None:
            raise BenchError("not_found", "Ollama has no models installed (ollama pull one, "
                             "e.g. `ollama pull llama3.2:3b`)", {"installed": []})
        return name, names[name].get("digest")

    async def run(self, spec: BenchSpec, digest: str | None) -> dict[str, Any]:
        """Measure ``spec`` and save the result (complete or partial); returns it."""
        if self.running is not None:
            raise BenchError("busy", f"benchmark {self.running['id']} is running; wait for it")
        run_id = new_id()
        self.running = {"id": run_id, "spec": spec.to_dict(), "progress": None}
        try:
            return await self._run(run_id, spec, digest)
        finally:
            self.running = None

    async def _run(self, run_id: str, spec: BenchSpec, digest: str | None) -> dict[str, Any]:
        client = self.t.client
        try:
            version = await client.version()
        except OllamaError as exc:
            raise BenchError("unavailable", f"Ollama is not reachable: {exc}") from None
        settings = await self._server_settings()
        started = time.time()

        def progress(data: dict[str, Any]) -> None:
            if self.running is not None:
                self.running["progress"] = data
            self.t.ctx.bus.publish(EVENT, data)

        runner = BenchRunner(client, spec, run_id, progress)
        measured = await runner.run()
        loaded = None
        try:
            for m in await client.loaded():
                if normalize_name(m.name) == normalize_name(spec.model):
                    loaded = {"size": m.size, "size_vram": m.size_vram,
                              "context_length": m.context_length,
                              "gpu_percent": round(100 * m.gpu_fraction, 1)}
        except OllamaError:
            pass  # Ollama died mid-run: the measured part and its error are what matter
        result = {"id": run_id, "time": started, "spec": spec.to_dict(),
                  "ollama": {"url": client.base_url, "version": version},
                  "model": {"name": spec.model, "digest": digest},
                  "server_settings": settings, "loaded": loaded, **measured}
        try:
            path = await run_blocking(self.store.save, result, timeout=10)
            result["path"] = str(path)
        except (OSError, TimeoutError) as exc:
            self.t.log.error("cannot save benchmark %s: %s", run_id, exc)
            result["save_error"] = str(exc)
        progress({"id": run_id, "phase": "finished", "done": runner.done,
                  "total": spec.requests, "complete": result["complete"],
                  "error": result["error"]})
        return result

    async def _server_settings(self) -> dict[str, str]:
        """The environment systemd gives Ollama (unit file and drop-ins) as velod reads it."""
        try:
            effective = await run_blocking(self.t.applier.dropins.effective, timeout=10)
        except (OSError, TimeoutError):
            return {}
        return dict(effective.environment)
