"""Control methods: registration with permissions, errors as values, parameter checks.

A capability exports methods by returning :class:`Method` objects from its
component's ``methods()``; the server never needs editing to add one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_params",
        "unknown_method",
        "permission_denied",
        "not_found",
        "unavailable",
        "busy",
        "internal",
    }
)


class RpcError(Exception):
    """An error reply: a stable string ``code``, a human ``message`` and optional ``data``."""

    def __init__(self, code: str, message: str, data: Any = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown RPC error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


@dataclass(frozen=True)
class Peer:
    """The process on the other end of a connection (from SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    admin: bool


class CallContext(Protocol):
    """What a handler may do with the connection that called it."""

    peer: Peer

    def notify(self, method: str, params: Any) -> bool:
        """Queue a notification to this peer; False when the connection is gone or full."""
        ...

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once when the connection closes."""
        ...


Handler = Callable[[dict[str, Any], CallContext], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    """One control method: ``admin`` methods change something and need an admin peer."""

    name: str
    handler: Handler
    admin: bool = False
    summary: str = ""


class Registry:
    """The table of methods the control server dispatches to."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, method: Method) -> None:
        if method.name in self._methods:
            raise ValueError(f"control method {method.name!r} registered twice")
        self._methods[method.name] = method

    def add_all(self, methods: Iterable[Method]) -> None:
        for method in methods:
            self.add(method)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)


_MISSING: Any = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a map"}


def param(params: dict[str, Any], key: str, kind: type | tuple[type, ...],
          default: Any = _MISSING, *, check: Callable[[Any], str | None] | None = None) -> Any:
    """Read ``params[key]`` as ``kind``; raise ``invalid_params`` naming the field.

    ``check`` returns a reason string when the value is out of range, else None.
    bool is never accepted where a number is asked for.
    """
    if key not in params or params[key] is None:
        if default is _MISSING:
            raise RpcError("invalid_params", f"missing parameter '{key}'", {"field": key})
        return default
    value = params[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise RpcError("invalid_params", f"parameter '{key}' must be {want}, got {value!r}",
                       {"field": key})
    if check is not None and (reason := check(value)):
        raise RpcError("invalid_params", f"parameter '{key}' {reason}, got {value!r}",
                       {"field": key})
    return value
