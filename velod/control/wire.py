"""The msgpack-rpc wire constants and encoders: the light half of the protocol.

velodctl imports only this module (not the decoder and its message types), which keeps
its start-up close to Python's own.
"""

from __future__ import annotations

import msgpack

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_request(msgid: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return _pack([REQUEST, msgid, method, [params or {}]])


def encode_response(msgid: int, error: dict[str, Any] | None, result: Any) -> bytes:
    return _pack([RESPONSE, msgid, error, result])


def encode_notification(method: str, params: Any) -> bytes:
    return _pack([NOTIFICATION, method, params])


def error_map(code: str, message: str, data: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}
