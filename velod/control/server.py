"""The control server: a thin asyncio adapter between the Unix socket and the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from velod.config import ControlConfig
from velod.control import protocol
from velod.control.peer import identify
from velod.control.registry import Peer, Registry, RpcError
from velod.errors import ServiceError

log = logging.getLogger("velod.control")

READ_CHUNK = 65536


class SocketInUse(Exception):
    """The socket path is taken by a live daemon, or is not a socket we may replace."""


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, connectable by everyone (mode 0666).

    A stale socket left by a crash is replaced only when nothing answers on it; a
    symlink or any other kind of file at the path is refused. The mode is set through
    the umask at bind time, so the socket is never briefly reachable with other rights.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise SocketInUse(f"{path} is a symbolic link; refusing to use it as the socket")
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; move it away or set "
                              "control.socket to another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise SocketInUse(f"cannot check existing socket {path}: {exc}") from exc
        else:
            raise SocketInUse(f"another velod is already answering on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o111)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Connection:
    """One client: reads framed messages, dispatches requests, writes replies and events."""

    def __init__(self, server: ControlServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: Peer) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.limits = server.limits
        self.decoder = protocol.Decoder(self.limits.max_message_size)
        self.inflight: set[asyncio.Task[None]] = set()
        self.streaming = False  # an events subscriber: exempt from the idle timeout
        self.closed = False
        self._on_close: list[Callable[[], None]] = []

    # -- CallContext -------------------------------------------------------------------
    def notify(self, method: str, params: Any) -> bool:
        self.streaming = True
        return self._write(protocol.encode_notification(method, params))

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    # -- internals ---------------------------------------------------------------------
    def _write(self, data: bytes) -> bool:
        if self.closed or self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > self.server.max_write_buffer:
            log.warning("pid %s does not read its replies; disconnecting", self.peer.pid)
            self.close(abort=True)
            return False
        self.writer.write(data)
        return True

    def _fail(self, code: str, message: str) -> None:
        """Tell the peer why it is being dropped (no msgid to answer), then drop it."""
        self._write(protocol.encode_notification("error", [protocol.error_map(code, message)]))
        self.close()
        # A peer that never reads would keep the flushing transport forever.
        asyncio.get_running_loop().call_later(1.0, self.writer.transport.abort)

    def close(self, abort: bool = False) -> None:
        """Stop serving this peer; ``abort`` drops unsent bytes instead of flushing them."""
        if abort:
            self.writer.transport.abort()
        if self.closed:
            return
        self.closed = True
        for task in self.inflight:
            task.cancel()
        for callback in self._on_close:
            try:
                callback()
            except Exception:
                log.exception("on_close callback failed")
        with contextlib.suppress(Exception):
            self.writer.close()

    async def run(self) -> None:
        try:
            while not self.closed:
                idle = None if self.streaming or self.inflight else self.limits.idle_timeout
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_CHUNK), idle)
                except TimeoutError:
                    self._fail("invalid_request", f"idle for {idle:g}s; closing")
                    return
                if not data:
                    return
                try:
                    messages = self.decoder.feed(data)
                except protocol.FramingError as exc:
                    self.server.counters["rejected"] += 1
                    self._fail("invalid_request", str(exc))
                    return
                for message in messages:
                    self._handle(message)
                    if self.closed:
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Request):
            if len(self.inflight) >= self.limits.max_inflight:
                self._write(protocol.encode_response(message.msgid, protocol.error_map(
                    "busy", f"more than {self.limits.max_inflight} requests in flight"), None))
                self.close()
                return
            task = asyncio.get_running_loop().create_task(self._call(message))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        elif isinstance(message, protocol.BadMessage):
            self.server.counters["rejected"] += 1
            if message.msgid is None:
                self._fail("invalid_request", message.reason)
            else:
                self._write(protocol.encode_response(
                    message.msgid, protocol.error_map("invalid_request", message.reason), None))
        # Responses and notifications from a client are not part of velod's API: ignored.

    async def _call(self, request: protocol.Request) -> None:
        try:
            result = await self.server.dispatch(request, self)
            reply = protocol.encode_response(request.msgid, None, result)
        except RpcError as exc:
            reply = protocol.encode_response(request.msgid, exc.to_wire(), None)
        except ServiceError as exc:  # a verb refused: the same code, message and data
            reply = protocol.encode_response(request.msgid, protocol.error_map(
                exc.code, exc.message, exc.data), None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not take the connection or daemon down
            log.exception("method %s failed", request.method)
            reply = protocol.encode_response(request.msgid, protocol.error_map(
                "internal", f"{request.method} failed: {type(exc).__name__}: {exc}"), None)
        self._write(reply)


class ControlServer:
    """Serves the registry on a Unix socket with limits and per-peer permissions."""

    def __init__(self, registry: Registry, limits: ControlConfig) -> None:
        self.registry = registry
        self.limits = limits
        self.connections: set[Connection] = set()
        self._conn_tasks: set[asyncio.Task[object]] = set()
        self.path: Path | None = None
        self.counters = {"requests": 0, "rejected": 0, "refused_connections": 0}
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    @property
    def max_write_buffer(self) -> int:
        # Unsent bytes we hold for one peer before calling it a slow consumer.
        return max(4 * self.limits.max_message_size, 64 * 1024)

    async def start(self, path: Path | None, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (socket activation) or on a new socket bound at ``path``."""
        if sock is None:
            assert path is not None
            sock = bind_socket(path)
            self.path = path
            self._inode = path.stat().st_ino
        self._server = await asyncio.start_unix_server(self._accept, sock=sock,
                                                       limit=READ_CHUNK)

    def reconfigure(self, limits: ControlConfig) -> None:
        """Adopt new limits for new connections and reads (the path needs a restart)."""
        self.limits = limits

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close(abort=True)
        if self._conn_tasks:  # let each connection see its EOF and finish cleanly
            await asyncio.wait(list(self._conn_tasks), timeout=1.0)
        if self.path is not None:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = identify(writer.get_extra_info("socket"), self.limits.admin_group)
        except OSError as exc:
            log.warning("cannot read peer credentials: %s", exc)
            writer.close()
            return
        conn = Connection(self, reader, writer, peer)
        if len(self.connections) >= self.limits.max_connections:
            self.counters["refused_connections"] += 1
            conn._fail("busy", f"too many connections (max {self.limits.max_connections})")
            return
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # shutting down: the connection is already closed
        finally:
            self.connections.discard(conn)
            self._conn_tasks.discard(task)  # type: ignore[arg-type]

    async def dispatch(self, request: protocol.Request, conn: Connection) -> Any:
        self.counters["requests"] += 1
        method = self.registry.get(request.method)
        if method is None:
            raise RpcError("unknown_method", f"no method {request.method!r}; "
                           "system.hello lists them", {"method": request.method})
        if method.admin and not conn.peer.admin:
            raise RpcError("permission_denied",
                           f"{request.method} changes the daemon and needs root, velod's own "
                           f"user or membership of group '{self.limits.admin_group}'")
        return await method.handler(request.params, conn)

    def status(self) -> dict[str, Any]:
        return {"socket": str(self.path) if self.path else None,
                "connections": len(self.connections), **self.counters}
