"""Component ``http``: the aiohttp server in the daemon's loop, started when ``http.listen``
is set, restarted when its config changes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.component import Component, Context
from velod.http.connections import ConnectionGate

if TYPE_CHECKING:
    from aiohttp import web

    from velod.config import Config, HttpConfig
    from velod.http.metrics import Metrics

MAX_KEY_BYTES = 4096


class ListenError(Exception):
    """The server cannot listen where ``http.listen`` says; the message says why."""


def parse_listen(value: str) -> tuple[str, int] | str:
    """``(host, port)`` for ``HOST:PORT`` or ``:PORT`` (loopback), or a Unix socket path."""
    if value.startswith("/"):
        return value
    host, _, port = value.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); ListenError if unusable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ListenError(f"http.api_key_file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_BYTES:
        raise ListenError(f"http.api_key_file {path} is larger than {MAX_KEY_BYTES} bytes")
    try:
        key = raw.decode().strip()
    except UnicodeDecodeError:
        raise ListenError(f"http.api_key_file {path} is not UTF-8 text") from None
    if not key or any(c.isspace() for c in key):
        raise ListenError(f"http.api_key_file {path} must hold one token without spaces")
    return key


class HttpServer(Component):
    """Serves the OpenAI- and Ollama-compatible APIs and /metrics (see ``velod.http``)."""

    name = "http"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.url: str | None = None
        self.warning: str | None = None
        self.metrics: Metrics | None = None
        self.gate: ConnectionGate | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._serving: HttpConfig | None = None

    async def start(self) -> None:
        await self._serve(self.config.http)

    async def stop(self) -> None:
        self.state = "stopping"
        await self._close()
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        self.config = config
        if config.http != self._serving:
            await self._close()
            await self._serve(config.http)

    async def _serve(self, http: HttpConfig) -> None:
        self._serving = http
        self.error = self.warning = None
        if not http.listen:
            self.state = "stopped"
            return
        try:
            await self._open(http)
        except ListenError as exc:
            self.error = str(exc)
            self.log.error("%s", exc)
            self.state = "failed"
            return
        self.error = self.warning
        self.state = "degraded" if self.warning else "running"
        self.log.info("serving HTTP on %s", self.url)

    async def _open(self, http: HttpConfig) -> None:
        from aiohttp import web

        from velod.http.app import build_app
        from velod.http.exchange import Api
        from velod.http.metrics import Metrics

        key = (await run_blocking(read_api_key, http.api_key_file, timeout=5.0)
               if http.api_key_file else None)
        where = parse_listen(http.listen)
        if isinstance(where, tuple) and not is_loopback(where[0]) and key is None:
            self.warning = (f"listening on {http.listen} without http.api_key_file: anyone who "
                            "can reach it can use the model; set a key")
            self.log.warning("%s", self.warning)
        self.metrics = Metrics(self.ctx.bus, self.ctx.services)
        self.gate = ConnectionGate(http.max_connections, http.max_connections_per_client,
                                   float(http.idle_timeout), float(http.retry_after))
        app = build_app(Api(self.ctx.services.get("engine"), http), self.metrics, key,
                        self.gate)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               keepalive_timeout=float(http.idle_timeout))
        await runner.setup()
        assert runner.server is not None
        protocols = self.gate.wrap(runner.server)
        loop = asyncio.get_running_loop()
        try:
            if isinstance(where, str):
                _clear_stale_socket(where)
                listener = await loop.create_unix_server(protocols, where)
            else:
                listener = await loop.create_server(protocols, where[0], where[1])
        except (OSError, ListenError) as exc:
            await runner.cleanup()
            self.metrics.close()
            self.metrics = None
            raise ListenError(f"cannot listen on {http.listen}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        self._runner, self._listener = runner, listener
        self.url = _url(listener, where)

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.url = None

    def status(self) -> dict[str, Any]:
        http = self.config.http
        if not http.listen:
            summary = "off (http.listen is empty)"
        elif self.url:
            summary = f"serving {self.url} (OpenAI /v1, Ollama /api, /metrics)"
            if self.gate is not None:
                summary += f"; {self.gate.open} connection{'s' * (self.gate.open != 1)} open"
        else:
            summary = f"not serving {http.listen}"
        gate = self.gate
        connections = ({"open": gate.open, "refused": gate.refused, "timed_out": gate.timed_out}
                       if gate is not None and self.url else None)
        return {"state": self.state, "error": self.error, "summary": summary, "url": self.url,
                "auth": bool(http.api_key_file), "connections": connections}


def _url(listener: asyncio.Server, where: tuple[str, int] | str) -> str:
    if isinstance(where, str):
        return f"http+unix://{where}"
    host, port = where
    for sock in listener.sockets:  # the bound port, when :0 asked for any
        port = sock.getsockname()[1]
        break
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _clear_stale_socket(path: str) -> None:
    """Remove a socket left at ``path`` by an earlier velod; refuse any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket")
    os.unlink(path)
