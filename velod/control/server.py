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
from velod.control.quota import ConnectionQuota
from velod.control.registry import Peer, Registry, RpcError
from velod.errors import ServiceError

log = logging.getLogger("velod.control")

# Read in small chunks: the stream buffers up to twice this per peer before pausing the
# socket, and a peer held back by backpressure keeps no more than that in memory.
READ_CHUNK = 16 * 1024


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
    """One client: reads framed messages, dispatches requests, writes replies and events.

    Reading stops while the peer has ``max_inflight`` requests in flight or while its
    replies are not being read (backpressure): accepted requests are always answered,
    and what one peer costs in memory stays bounded.
    """

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
        self._slot_free = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._idle_since = loop.time()  # last complete request or last reply
        self._partial_since: float | None = None  # first byte of an incomplete request

    # -- CallContext -------------------------------------------------------------------
    def notify(self, method: str, params: Any) -> bool:
        """Queue an event; a subscriber whose events pile up unread is dropped."""
        self.streaming = True
        if self.closed or self.writer.is_closing():
            return False
        if self._buffered() > self.server.output_per_connection:  # a burst is fine
            log.warning("pid %s (uid %s) does not read its replies; disconnecting",
                        self.peer.pid, self.peer.uid)
            self.close(abort=True)
            return False
        self.writer.write(protocol.encode_notification(method, params))
        return True

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    # -- internals ---------------------------------------------------------------------
    def _buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def _write(self, data: bytes) -> None:
        """Queue a reply: never dropped while the connection lives (reading stops instead)."""
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

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
        self._slot_free.set()
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
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                took = False
                while (message := self.decoder.next_message()) is not None:
                    took = True
                    self._idle_since = loop.time()
                    paused = loop.time()
                    if not await self._room_for_request():
                        return
                    self._resume(paused)
                    self._handle(message)
                    if self.closed:
                        return
                    # One request per peer per loop turn: a peer with a deep pipeline gets
                    # no more of the loop than one that sends a single ping.
                    await asyncio.sleep(0)
                # What is left is the start of a request that arrived in the last read.
                if not self.decoder.buffered:
                    self._partial_since = None
                elif took or self._partial_since is None:
                    self._partial_since = loop.time()
                paused = loop.time()
                if not await self._room_to_write():
                    return
                self._resume(paused)
                timeout, why = self._read_deadline(loop.time())
                try:
                    data = await asyncio.wait_for(
                        self.reader.read(min(READ_CHUNK, self.decoder.room)), timeout)
                except TimeoutError:
                    self._fail("invalid_request", why)
                    return
                if not data:
                    return
                self.decoder.push(data)
        except protocol.FramingError as exc:
            self.server.counters["rejected"] += 1
            self._fail("invalid_request", str(exc))
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _resume(self, since: float) -> None:
        """Time velod itself spent not reading does not count against a half-sent request."""
        if self._partial_since is not None:
            self._partial_since += asyncio.get_running_loop().time() - since

    def _read_deadline(self, now: float) -> tuple[float | None, str]:
        """How long the next read may wait, and what to tell the peer when it runs out.

        A request must arrive whole within ``message_timeout`` of its first byte (a peer
        sending a byte a second is dropped); a peer with nothing in flight and nothing
        half-sent is dropped after ``idle_timeout``, unless it subscribed to events.
        """
        deadlines = []
        if self._partial_since is not None:
            deadlines.append((self._partial_since + self.limits.message_timeout,
                              f"a request did not arrive whole within "
                              f"{self.limits.message_timeout:g}s; closing"))
        if not (self.streaming or self.inflight):
            deadlines.append((self._idle_since + self.limits.idle_timeout,
                              f"idle for {self.limits.idle_timeout:g}s; closing"))
        if not deadlines:
            return None, ""
        at, why = min(deadlines)
        return max(0.0, at - now), why

    async def _room_for_request(self) -> bool:
        """Wait until fewer than ``max_inflight`` requests are in flight and the replies
        fit (see _room_to_write); False once closed."""
        while len(self.inflight) >= self.limits.max_inflight and not self.closed:
            self._slot_free.clear()
            await self._slot_free.wait()
        return not self.closed and await self._room_to_write()

    async def _room_to_write(self) -> bool:
        """Wait until this peer's unsent replies are within its share of the output bound.

        A peer that reads nothing for ``idle_timeout`` while its replies wait is dropped;
        False then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.idle_timeout
        while not self.closed:
            share = self.server.output_share()
            if self._buffered() <= share:
                return True
            if loop.time() >= deadline:
                log.warning("pid %s (uid %s) does not read its replies; disconnecting",
                            self.peer.pid, self.peer.uid)
                self.close(abort=True)
                return False
            # The transport wakes drain() once its buffer is down to a quarter of this.
            self.writer.transport.set_write_buffer_limits(high=share)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.writer.drain(), deadline - loop.time())
        return False

    def _handle(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Request):
            task = asyncio.get_running_loop().create_task(self._call(message))
            self.inflight.add(task)
            task.add_done_callback(self._finished)
        elif isinstance(message, protocol.BadMessage):
            self.server.counters["rejected"] += 1
            if message.msgid is None:
                self._fail("invalid_request", message.reason)
            else:
                self._write(protocol.encode_response(
                    message.msgid, protocol.error_map("invalid_request", message.reason), None))
        elif isinstance(message, protocol.Notification):
            # msgpack-rpc servers ignore notifications they do not know (pynvim, for one,
            # starts every session with nvim_set_client_info).
            log.debug("ignoring notification %r from pid %s", message.method[:100],
                      self.peer.pid)
        # Responses from a client are not part of velod's API: ignored.

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not self.inflight:
            self._idle_since = asyncio.get_running_loop().time()
        self._slot_free.set()

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
        self.quota = ConnectionQuota()
        self._conn_tasks: set[asyncio.Task[object]] = set()
        self.path: Path | None = None
        self.counters = {"requests": 0, "rejected": 0, "refused_connections": 0}
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    # Unsent bytes held for one peer before velod stops reading its requests (or drops it,
    # for an events subscriber), and for all peers together: each peer gets an equal share
    # of the overall bound, at most output_per_connection. A share can be passed only by
    # the replies already in flight, at most max_inflight of them per peer.
    output_per_connection = 256 * 1024
    output_overall = 4 * 1024**2

    def output_share(self) -> int:
        """Unsent bytes one peer may have before velod stops reading from it."""
        share = self.output_overall // max(1, len(self.connections))
        return max(16 * 1024, min(self.output_per_connection, share))

    def output_total(self) -> int:
        """Unsent bytes held for all peers together."""
        return sum(c._buffered() for c in self.connections)

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
        refusal = self.quota.refusal(peer, self.limits)
        if refusal is not None:
            self.counters["refused_connections"] += 1
            log.debug("refusing pid %s (uid %s): %s", peer.pid, peer.uid, refusal)
            conn._fail("busy", refusal)
            return
        self.connections.add(conn)
        self.quota.add(peer)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # shutting down: the connection is already closed
        finally:
            self.connections.discard(conn)
            self.quota.remove(peer)
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
                "connections": len(self.connections), "users": len(self.quota.by_uid),
                "unsent_bytes": self.output_total(), **self.counters}
