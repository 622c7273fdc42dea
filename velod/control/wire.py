"""The msgpack-rpc message shapes, shared by the server and velodctl without any codec.

The server encodes them with the C msgpack (``protocol``); velodctl with the small
pure-Python ``minipack``, so that its start-up stays close to Python's own.
"""

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1


def request(msgid: int, method: str, params: "dict[str, Any] | None" = None) -> "list[Any]":
    return [REQUEST, msgid, method, [params or {}]]


def response(msgid: int, error: "dict[str, Any] | None", result: "Any") -> "list[Any]":
    return [RESPONSE, msgid, error, result]


def notification(method: str, params: "Any") -> "list[Any]":
    return [NOTIFICATION, method, params]


def error_map(code: str, message: str, data: "Any" = None) -> "dict[str, Any]":
    return {"code": code, "message": message, "data": data}
