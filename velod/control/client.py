"""A small synchronous client for the control socket (used by velodctl and tests).

The transport is any connected stream socket; :meth:`Client.connect` makes one for a
path. Imports stay minimal so ``velodctl status`` starts nearly as fast as Python.
"""

# The C module directly: `socket` adds selectors, array and enum to every velodctl start.
import _socket

from velod.control import minipack, wire

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterator
    from typing import Any


class DaemonUnreachable(Exception):
    """No daemon answers at the socket path, or the connection to it was lost; the message
    says what to check. ``code`` is velod's reason when it gave one (``busy``, ...)."""

    def __init__(self, message: str, code: str = "unreachable") -> None:
        super().__init__(message)
        self.code = code


class ReplyTooLarge(Exception):
    """velod answered with more bytes than this client accepts (``Client.max_reply_size``)."""


class RemoteError(Exception):
    """The daemon answered with an error map {code, message, data}."""

    def __init__(self, code: str, message: str, data: "Any" = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.data = data


class Client:
    max_reply_size = 64 * 1024**2

    def __init__(self, sock: "socket.socket", max_message_size: "int | None" = None) -> None:
        self.sock = sock
        self._unpacker = minipack.Unpacker(
            max_buffer_size=max_message_size or self.max_reply_size)
        self._last_id = 0
        self.last_result: Any = None  # the reply to events.subscribe, kept by subscribe()
        self._pending: list[Any] = []  # notifications that arrived during a call

    @classmethod
    def connect(cls, path: str, timeout: float | None = 30.0) -> "Client":
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(f"velod is not running: no socket at {path} — is "
                                    "velod.service started? (or pass --socket)") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnreachable(f"velod is not running: nothing answers on {path} "
                                    "(a stale socket) — is velod.service started?") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(f"permission denied connecting to {path}") from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"cannot connect to velod at {path}: {exc}") from None
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_message(self) -> "Any":
        while True:
            try:
                for obj in self._unpacker:
                    return obj
            except minipack.FormatError as exc:
                raise DaemonUnreachable(f"velod's answer could not be decoded: {exc}") from None
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise DaemonUnreachable("velod did not answer in time") from None
            except OSError as exc:
                raise DaemonUnreachable(f"connection to velod failed: {exc}") from None
            if not data:
                raise DaemonUnreachable("velod closed the connection without answering")
            try:
                self._unpacker.feed(data)
            except minipack.FormatError:
                raise ReplyTooLarge(
                    f"velod's reply is larger than the {self._unpacker.max_buffer_size} bytes "
                    "this client accepts; ask for less (a smaller range or count)") from None

    def _send(self, data: bytes) -> None:
        """Send a whole request; a connection velod already dropped says why it did."""
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise DaemonUnreachable("velod did not take the request in time") from None
        except OSError as exc:
            # velod may have refused us (busy) and hung up: its last words are still queued.
            self.sock.settimeout(0.5)
            while True:
                try:
                    msg = self._next_message()
                except DaemonUnreachable:
                    raise DaemonUnreachable("velod closed the connection "
                                            f"({exc.strerror or exc})") from None
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == wire.NOTIFICATION:
                    self._raise_if_error(msg)

    def call(self, method: str, params: "dict[str, Any] | None" = None,
             timeout: float | None = None,
             on_notification: "Callable[[str, Any], None] | None" = None) -> "Any":
        """Send one request and wait for its response; RemoteError on an error reply.

        ``on_notification(method, params)`` gets each notification that arrives before the
        response, as it arrives (streamed results); without it they are kept for
        :meth:`notifications`."""
        self._last_id = msgid = self._last_id % wire.MAX_MSGID + 1
        if timeout is not None:
            self.sock.settimeout(timeout)
        self._send(minipack.packb(wire.request(msgid, method, params)))
        while True:
            msg = self._next_message()
            if not isinstance(msg, list) or not msg:
                continue
            if msg[0] == wire.RESPONSE and len(msg) == 4 and msg[1] == msgid:
                if msg[2] is not None:
                    err = msg[2] if isinstance(msg[2], dict) else {"message": str(msg[2])}
                    raise RemoteError(str(err.get("code", "internal")),
                                      str(err.get("message", err)), err.get("data"))
                return msg[3]
            if msg[0] == wire.NOTIFICATION and len(msg) == 3:
                self._raise_if_error(msg)
                if on_notification is not None:
                    on_notification(msg[1], msg[2])
                else:
                    self._pending.append(msg)

    @staticmethod
    def _raise_if_error(msg: "list[Any]") -> None:
        """An ``error`` notification is velod dropping or refusing this connection."""
        if msg[1] == "error":
            err = msg[2][0] if isinstance(msg[2], list) and msg[2] else {}
            err = err if isinstance(err, dict) else {}
            code = str(err.get("code", "invalid_request"))
            raise DaemonUnreachable(f"velod dropped the connection: "
                                    f"{err.get('message', 'no reason given')} [{code}]", code)

    def notifications(self) -> "Iterator[tuple[str, Any]]":
        """Yield (method, params) of notifications until the connection ends."""
        self.sock.settimeout(None)
        while True:
            msg = self._pending.pop(0) if self._pending else self._next_message()
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == wire.NOTIFICATION:
                self._raise_if_error(msg)
                yield msg[1], msg[2]

    def subscribe(self, topics: list[str]) -> "Iterator[dict[str, Any]]":
        """Subscribe now to event topics; iterate the result for event maps
        {topic, seq, time, data}."""
        self.last_result = self.call("events.subscribe", {"topics": topics})
        return self._events()

    def _events(self) -> "Iterator[dict[str, Any]]":
        for method, params in self.notifications():
            if method == "event" and isinstance(params, list) and params:
                yield params[0]
