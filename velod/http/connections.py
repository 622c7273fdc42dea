"""The HTTP server's connection bounds: how many at once, each client's share, idle time.

velod listens on loopback for every local user, so one user opening thousands of
connections (or holding them open with a header sent a byte at a time) must not use up the
daemon's file descriptors or lock the others out. A :class:`ConnectionGate` wraps the
server's protocol factory: a connection past ``max_connections``, or past its client's
``max_per_client``, gets a 503 and is closed before aiohttp sees it; a connection that has
no request being served for ``idle_timeout`` seconds is closed, whether it is idle between
requests or still sending a request's head. The application's outermost middleware marks
when a request is being served (:meth:`ConnectionGate.serving`).

A client is the peer's address for TCP (all local users share 127.0.0.1) and the peer's
uid for a Unix socket (from SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_UCRED = struct.Struct("3i")


def client_of(transport: asyncio.BaseTransport) -> str:
    """Who is on the other end: ``uid:N`` on a Unix socket, the address for TCP."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            return f"uid:{_UCRED.unpack(raw)[1]}"
        except OSError:
            return "uid:?"
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def refusal(message: str, retry_after: float) -> bytes:
    """A complete HTTP/1.1 503 response carrying ``message`` as JSON, closing the connection."""
    body = json.dumps({"error": message, "code": "busy"}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after:g}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


@dataclass
class _Open:
    client: str
    serving: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class ConnectionGate:
    """Admits, counts and times out the HTTP server's connections (see the module)."""

    max_connections: int
    max_per_client: int
    idle_timeout: float
    retry_after: float = 1.0
    refused: int = 0
    timed_out: int = 0
    _open: dict[asyncio.BaseTransport, _Open] = field(default_factory=dict)
    _clients: Counter[str] = field(default_factory=Counter)

    @property
    def open(self) -> int:
        return len(self._open)

    def wrap(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that passes ``make()``'s protocols the connections it admits."""
        return lambda: _Gated(self, make())

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Register ``transport``; None if admitted, else why it is refused."""
        client = client_of(transport)
        if len(self._open) >= self.max_connections:
            why = (f"velod has {self.max_connections} HTTP connections open "
                   "(http.max_connections); retry shortly")
        elif self._clients[client] >= self.max_per_client:
            why = (f"this client has {self.max_per_client} HTTP connections open "
                   "(http.max_connections_per_client); close some first")
        else:
            self._open[transport] = _Open(client)
            self._clients[client] += 1
            self._arm(transport)
            return None
        self.refused += 1
        return why

    def release(self, transport: asyncio.BaseTransport) -> None:
        """Forget ``transport`` (its connection is gone)."""
        entry = self._open.pop(transport, None)
        if entry is None:
            return
        if entry.timer is not None:
            entry.timer.cancel()
        self._clients[entry.client] -= 1
        if self._clients[entry.client] <= 0:
            del self._clients[entry.client]

    @contextmanager
    def serving(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """While a request on ``transport`` is being served, its idle clock is stopped."""
        entry = self._open.get(transport) if transport is not None else None
        if entry is None:
            yield
            return
        entry.serving += 1
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        try:
            yield
        finally:
            entry.serving -= 1
            if entry.serving == 0 and transport in self._open:
                self._arm(transport)

    def _arm(self, transport: asyncio.BaseTransport) -> None:
        entry = self._open[transport]
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(self.idle_timeout, self._expire, transport)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        entry = self._open.get(transport)
        if entry is None or entry.serving:
            return
        self.timed_out += 1
        self.release(transport)
        transport.abort()  # type: ignore[attr-defined]


class _Gated(asyncio.Protocol):
    """Hands ``inner`` the connection when the gate admits it; otherwise answers 503."""

    def __init__(self, gate: ConnectionGate, inner: asyncio.Protocol) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = inner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        why = self._gate.admit(transport)
        if why is not None:
            self._inner = None
            transport.write(refusal(why, self._gate.retry_after))  # type: ignore[attr-defined]
            transport.close()
            return
        self._transport = transport
        assert self._inner is not None
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._gate.release(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
