"""The HTTP server's connection bounds: how many at once, each client's share, idle time.

velod listens on loopback for every local user, so one user opening thousands of
connections (or holding them open with a header sent a byte at a time) must not use up the
daemon's file descriptors or lock the others out. A :class:`ConnectionGate` wraps the
server's protocol factory: a connection past ``max_connections``, or past its client's
``max_per_client``, gets a 503 and is closed before aiohttp sees it; a connection that has
no request being served for ``idle_timeout`` seconds is closed, whether it is idle between
requests or still sending a request's head. The application's outermost middleware marks
when a request is being served (:meth:`ConnectionGate.serving`).

A client is a user where velod can tell which: the peer's uid on a Unix socket (from
SO_PEERCRED) and on a TCP connection from this machine (the kernel's sock_diag names the uid
that owns the other end), so that local users each have their own share; for connections
from elsewhere it is the peer's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from velod.control.peer import peer_credentials

_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST = 4, 20, 1
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
_DIAG_UID_OFFSET = _NLMSG_HEADER.size + 4 + 48 + 12  # inet_diag_msg: ..., id, 3 u32, uid


def client_of(transport: asyncio.BaseTransport) -> str:
    """Who is on the other end: ``uid:N`` when velod can tell, else the peer's address."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            return f"uid:{peer_credentials(sock)[1]}"
        except OSError:
            return "uid:?"
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return "?"
    if sock is not None and ipaddress.ip_address(peer[0].split("%")[0]).is_loopback:
        uid = loopback_peer_uid(sock.family, peer[:2], sock.getsockname()[:2])
        if uid is not None:
            return f"uid:{uid}"
    return str(peer[0])


def loopback_peer_uid(family: int, peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket at ``peer`` whose other end is ``local`` (both on this
    machine), asked of the kernel through sock_diag (one netlink request); None if unknown."""
    def address(host: str) -> bytes:
        return socket.inet_pton(family, host.split("%")[0]).ljust(16, b"\0")

    sockid = (struct.pack("!HH", peer[1], local[1]) + address(peer[0]) + address(local[0])
              + struct.pack("=I", 0) + _NO_COOKIE)
    request = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    message = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                 _NLM_F_REQUEST, 1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(0.2)  # the kernel answers at once; never wait on it for long
            nl.sendto(message, (0, 0))
            reply = nl.recv(4096)
    except (OSError, ValueError):
        return None
    if len(reply) < _DIAG_UID_OFFSET + 4:
        return None
    if _NLMSG_HEADER.unpack_from(reply)[1] != _SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (it closed already)
    return int(struct.unpack_from("=I", reply, _DIAG_UID_OFFSET)[0])


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
    lingering: int = 0  # refused connections being closed gracefully (see _Gated)
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
            why = (f"this client ({client}) has {self.max_per_client} HTTP connections open "
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
    """Hands ``inner`` the connection when the gate admits it; otherwise answers 503.

    A refused connection is closed gracefully: the answer, then end-of-file, then whatever
    the client still sends is read and dropped until it closes (at most ``LINGER`` seconds),
    so that its request left unread does not make the kernel reset the connection before
    the client has read the 503. Past ``MAX_LINGERING`` such connections at once, refused
    ones are closed at once instead.
    """

    LINGER = 1.0
    MAX_LINGERING = 64

    def __init__(self, gate: ConnectionGate, inner: asyncio.Protocol) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = inner
        self._transport: asyncio.BaseTransport | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        why = self._gate.admit(transport)
        if why is not None:
            self._inner = None
            self._refuse(transport, why)
            return
        self._transport = transport
        assert self._inner is not None
        self._inner.connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, why: str) -> None:
        transport.write(refusal(why, self._gate.retry_after))  # type: ignore[attr-defined]
        if self._gate.lingering >= self.MAX_LINGERING:
            transport.close()
            return
        self._gate.lingering += 1
        transport.write_eof()  # type: ignore[attr-defined]
        self._linger = asyncio.get_running_loop().call_later(
            self.LINGER, transport.abort)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._gate.lingering -= 1
        if self._transport is not None:
            self._gate.release(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:  # a refused connection's bytes are dropped
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
