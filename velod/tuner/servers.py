"""The tuner component: one :class:`~velod.tuner.service.Tuner` per managed server.

The servers come from the config (``backends.configured``): Ollama unless
``ollama.enabled`` is false, and each ``llama_server`` entry with a URL. Each server's tuner
runs its own loop, history and benchmarks; this component starts and stops them, adds and
removes them on a config reload, and routes the control verbs: reading verbs (``show``,
``plan``, ``history``) to the server named (``server``), else every one; changing verbs
(``apply``, ``rollback``) to the server named, which is required when several are managed.
``velodctl status`` shows one line per server.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from velod.component import TROUBLE, Component, Context
from velod.errors import InvalidParams, NotFound, Unavailable
from velod.tuner.backends import configured, configured_names
from velod.tuner.bench.store import BenchNotFound
from velod.tuner.service import Tuner

if TYPE_CHECKING:
    from velod.config import Config


class TunerService(Component):
    """Component ``tuner`` (``velod.tuner.servers:TunerService``)."""

    name = "tuner"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.tuners: dict[str, Tuner] = {b.name: Tuner(self._server_context(ctx), b)
                                         for b in configured(ctx.config)}

    def _server_context(self, ctx: Context) -> Context:
        """The context of a server's tuner: its changes of state come here, and this
        component's own state (the worst of them) is what the daemon logs and reports."""
        return dataclasses.replace(ctx, on_state_change=self._server_state_changed)

    def _server_state_changed(self, tuner: Any, old: str, new: str) -> None:
        if self.state not in ("running", *TROUBLE):
            return  # starting or stopping: the servers' states say nothing yet
        troubled = [t for t in self.tuners.values() if t.state in TROUBLE]
        if troubled:
            worst = troubled[0]
            error = worst.error if len(self.tuners) == 1 else \
                f"{worst.backend.name}: {worst.error}"
            self.state, self.error = worst.state, error
        elif self.state in TROUBLE:
            self.state, self.error = "running", None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.state = "running"
        for tuner in self.tuners.values():
            await tuner.start()

    async def stop(self) -> None:
        self.state = "stopping"
        await asyncio.gather(*(t.stop() for t in self.tuners.values()))
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        self.config = config
        wanted = configured_names(config)
        for name in [n for n in self.tuners if n not in wanted]:
            await self.tuners.pop(name).stop()
        ctx = self._server_context(dataclasses.replace(self.ctx, config=config))
        for backend in configured(config):
            tuner = self.tuners.get(backend.name)
            if tuner is None:
                self.tuners[backend.name] = tuner = Tuner(ctx, backend)
                await tuner.start()
            else:
                await backend.close()  # built only to learn the names; the tuner keeps its own
                await tuner.reconfigure(config)
        self.tuners = {n: self.tuners[n] for n in wanted}
        self._server_state_changed(None, "", "")  # a removed server's trouble goes with it

    def status(self) -> dict[str, Any]:
        servers = {name: t.status() for name, t in self.tuners.items()}
        if not servers:
            return {"state": "running", "error": None, "servers": {},
                    "summary": "no server to tune (ollama.enabled is false and no "
                    "llama_server has a url)"}
        first = next(iter(servers.values()))
        out = dict(first)
        out.update({"state": self.state, "error": self.error, "servers": servers})
        if "ollama" in servers:
            out["ollama"] = servers["ollama"]["server"]  # the shape before llama-server
        if len(servers) > 1:
            out["summary"] = "; ".join(f"{n}: {s['summary']}" for n, s in servers.items())
        return out

    # ------------------------------------------------------------------ routing
    def tuner(self, server: str | None = None, *, changes: bool = False,
              kind: str | None = None) -> Tuner:
        """The tuner of ``server`` (or of the only server of ``kind``); without either, the
        first server, except for ``changes`` when several are managed."""
        if not self.tuners:
            raise Unavailable("no server to tune: set ollama.enabled: true or give a "
                              "llama_server a url")
        names = ", ".join(self.tuners)
        if server is not None:
            if server not in self.tuners:
                raise NotFound(f"no managed server {server!r} (managed: {names})",
                               {"servers": list(self.tuners)})
            return self.tuners[server]
        if kind is not None:
            matching = [t for t in self.tuners.values() if t.backend.kind == kind]
            if not matching:
                raise NotFound(f"no managed {kind} server (managed: {names})",
                               {"servers": list(self.tuners)})
            if len(matching) > 1:
                raise InvalidParams(f"several {kind} servers are managed: name one with "
                                    f"--server ({', '.join(t.backend.name for t in matching)})")
            return matching[0]
        if changes and len(self.tuners) > 1:
            raise InvalidParams(f"several servers are managed ({names}): name the one to "
                                "change with --server")
        return next(iter(self.tuners.values()))

    def _with_servers(self, result: dict[str, Any]) -> dict[str, Any]:
        return {**result, "servers": list(self.tuners)}

    # ------------------------------------------------------------------ verbs
    async def ollama_status(self) -> dict[str, Any]:
        """Ollama's reachability, version and loaded models (Ollama must be managed)."""
        if "ollama" not in self.tuners:
            raise Unavailable("Ollama is not managed (ollama.enabled: false)")
        return await self.tuners["ollama"].ollama_status()

    async def show(self, server: str | None = None) -> dict[str, Any]:
        """One server's current vs recommended settings; ``servers`` names them all."""
        return self._with_servers(await self.tuner(server).show())

    async def what_if(self, server: str | None = None, **what: Any) -> dict[str, Any]:
        """One server's plan for this or a what-if machine; ``servers`` names them all."""
        return self._with_servers(await self.tuner(server).what_if(**what))

    async def apply(self, now: bool = False, server: str | None = None) -> dict[str, Any]:
        return await self.tuner(server, changes=True).apply(now=now)

    async def rollback(self, server: str | None = None) -> dict[str, Any]:
        return await self.tuner(server, changes=True).rollback()

    async def decisions(self, limit: int, server: str | None = None) -> dict[str, Any]:
        """The last ``limit`` decisions of one server, or of all merged by time."""
        chosen = [self.tuner(server)] if server is not None else list(self.tuners.values())
        entries: list[dict[str, Any]] = []
        skipped, warnings = 0, []
        for tuner in chosen:
            got = await tuner.decisions(limit)
            entries += [{**e, "server": tuner.backend.name} for e in got["entries"]]
            skipped += got.get("skipped") or 0
            if got.get("warning"):
                warnings.append(got["warning"])
        entries.sort(key=lambda e: e["time"] if isinstance(e.get("time"), int | float) else 0)
        return {"entries": entries[-limit:],
                "path": str(chosen[0].history.path) if chosen else None,
                "paths": {t.backend.name: str(t.history.path) for t in chosen},
                "skipped": skipped, "warning": "; ".join(warnings) or None}

    async def bench_run(self, model: str | None, server: str | None = None,
                        backend: str | None = None, **spec: Any) -> dict[str, Any]:
        """Benchmark ``model`` on the server named, or the one of kind ``backend``."""
        return await self.tuner(server, kind=None if server else backend).bench_run(model,
                                                                                   **spec)

    async def bench_list(self, limit: int) -> dict[str, Any]:
        result = await self._bench_owner().bench_list(limit)
        running = [t.bench.running for t in self.tuners.values() if t.bench.running]
        return {**result, "running": running[0] if running else None}

    async def bench_show(self, ref: str) -> dict[str, Any]:
        return await self._bench_owner().bench_show(ref)

    async def bench_compare(self, a_ref: str, b_ref: str) -> dict[str, Any]:
        return await self._bench_owner().bench_compare(a_ref, b_ref)

    def _bench_owner(self) -> Tuner:
        """Any tuner: every server saves its results in the one store of the state dir."""
        if not self.tuners:
            raise NotFound(str(BenchNotFound("no server is managed, so no benchmark store")))
        return next(iter(self.tuners.values()))
