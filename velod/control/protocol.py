"""MessagePack-RPC framing for the control socket: bytes in, messages out (sans-I/O).

The wire format is the msgpack-rpc spec, as Neovim uses it:
request ``[0, msgid, method, params]``, response ``[1, msgid, error, result]``,
notification ``[2, method, params]``. Messages follow each other on the stream
with no length prefix; msgpack itself frames them. velod methods take one map:
``params = [{...}]`` (``[]`` means ``{}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from velod.control import wire
from velod.control.wire import MAX_MSGID, NOTIFICATION, REQUEST, RESPONSE, error_map

__all__ = ["NOTIFICATION", "REQUEST", "RESPONSE", "Decoder", "FramingError", "classify",
           "encode_notification", "encode_request", "encode_response", "error_map"]


@dataclass(frozen=True)
class Request:
    msgid: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True)
class Notification:
    method: str
    params: Any


@dataclass(frozen=True)
class BadMessage:
    """A well-framed message of the wrong shape; ``msgid`` is set when one could be read."""

    reason: str
    msgid: int | None = None


Message = Request | Response | Notification | BadMessage


class FramingError(Exception):
    """The byte stream cannot be decoded any further: garbage, or a message over the limit."""


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


class Decoder:
    """Incremental decoder: ``push(bytes)``, then ``next_message()`` until it gives None.

    ``max_message_size`` bounds the buffered bytes of one incomplete message (msgpack's
    own default would allow 100 MiB); ``room`` says how many bytes may be pushed now.
    Messages are decoded one at a time, when the caller is ready for them, so a chunk
    of thousands of tiny pipelined requests never sits decoded in memory. Once a
    FramingError is raised the stream is out of sync and the connection must be closed.
    """

    def __init__(self, max_message_size: int) -> None:
        self._unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=max_message_size, ext_hook=_no_ext,
            strict_map_key=False, use_list=True,
        )
        self.max_message_size = max_message_size
        self._fed = 0  # bytes fed so far; minus tell() = bytes still buffered

    @property
    def buffered(self) -> int:
        """Bytes pushed and not yet taken out as messages."""
        return self._fed - self._unpacker.tell()

    @property
    def room(self) -> int:
        """Bytes that may be pushed now without passing the message size limit."""
        return self.max_message_size - self.buffered

    def push(self, data: bytes | memoryview) -> None:
        """Buffer ``data``, at most ``room`` bytes of it."""
        if len(data) > self.room:
            raise ValueError(f"pushed {len(data)} bytes with room for {self.room}")
        self._unpacker.feed(data)
        self._fed += len(data)

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are pushed."""
        try:
            obj = next(self._unpacker)
        except StopIteration:
            if self.room <= 0:
                raise FramingError(f"message larger than {self.max_message_size} bytes"
                                   ) from None
            return None
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
                UnicodeDecodeError, TypeError) as exc:
            raise FramingError(f"undecodable bytes ({type(exc).__name__}: {exc})") from exc
        return classify(obj)

    def feed(self, data: bytes) -> list[Message]:
        """Push all of ``data`` and return every message it completes."""
        out: list[Message] = []
        view = memoryview(data)
        while True:
            while (message := self.next_message()) is not None:
                out.append(message)
            if not view:
                return out
            # No more than the free space at a time, with messages taken out in between,
            # so many small pipelined messages never count as one big one.
            chunk, view = view[:self.room], view[self.room:]
            self.push(chunk)


def _is_msgid(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


def classify(obj: Any) -> Message:
    """Turn one decoded msgpack object into a typed message (or a BadMessage)."""
    if not isinstance(obj, list) or not obj:
        return BadMessage("a message must be a msgpack array [type, ...]")
    kind = obj[0]
    if kind == REQUEST and type(kind) is int:
        msgid = obj[1] if len(obj) > 1 and _is_msgid(obj[1]) else None
        if len(obj) != 4:
            return BadMessage("a request is [0, msgid, method, params]", msgid)
        if msgid is None:
            return BadMessage("msgid must be an unsigned 32-bit integer")
        params = _params(obj[3])
        method = _method_name(obj[2])
        if method is None:
            return BadMessage("method must be a UTF-8 string", msgid)
        if isinstance(params, str):
            return BadMessage(params, msgid)
        return Request(msgid, method, params)
    if kind == RESPONSE and type(kind) is int and len(obj) == 4 and _is_msgid(obj[1]):
        return Response(obj[1], obj[2], obj[3])
    if kind == NOTIFICATION and type(kind) is int and len(obj) == 3:
        method = _method_name(obj[1])
        if method is not None:
            return Notification(method, obj[2])
    return BadMessage("unknown message type or shape")


def _method_name(value: Any) -> str | None:
    """A method name from msgpack str or bin (as pynvim and older packers send), or None."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _params(params: Any) -> dict[str, Any] | str:
    """The single params map, or a reason string when params are malformed."""
    if isinstance(params, dict):  # lenient: a bare map instead of [map]
        candidate = params
    elif isinstance(params, list) and len(params) <= 1:
        candidate = params[0] if params else {}
    else:
        return "params must be [] or [map]"
    if not isinstance(candidate, dict) or not all(isinstance(k, str) for k in candidate):
        return "params must be [] or [map] with string keys"
    return candidate


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(msgid: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return _pack(wire.request(msgid, method, params))


def encode_response(msgid: int, error: dict[str, Any] | None, result: Any) -> bytes:
    return _pack(wire.response(msgid, error, result))


def encode_notification(method: str, params: Any) -> bytes:
    return _pack(wire.notification(method, params))
