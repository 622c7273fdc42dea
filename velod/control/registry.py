"""Control methods: declaration with permissions, errors as values, parameter checks.

Every control method is declared one way: a function in a capability's ``rpc`` module
marked with :func:`rpc` (its name, whether it needs an admin peer, a summary), taking the
capability's service, the params map and the call context. The daemon binds each module
to its service with :func:`methods_of` (``velod.capabilities`` says which module serves
which service); the server never needs editing to add one.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

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


RpcFunction = Callable[[Any, dict[str, Any], CallContext], Awaitable[Any]]
F = TypeVar("F", bound=RpcFunction)


@dataclass(frozen=True)
class Declared:
    """What :func:`rpc` records on a function."""

    name: str
    admin: bool
    summary: str


def rpc(name: str, *, admin: bool = False, summary: str = "") -> Callable[[F], F]:
    """Declare ``async def fn(service, params, ctx)`` as control method ``name``; ``admin``
    methods change something and need an admin peer."""
    def declare(fn: F) -> F:
        fn.__rpc__ = Declared(name, admin, summary)  # type: ignore[attr-defined]
        return fn
    return declare


def methods_of(module: ModuleType, service: Any) -> list[Method]:
    """The methods ``module`` declares with :func:`rpc`, bound to ``service``."""
    methods = []
    for fn in vars(module).values():
        declared: Declared | None = getattr(fn, "__rpc__", None)
        if declared is not None and getattr(fn, "__module__", None) == module.__name__:
            methods.append(Method(declared.name, functools.partial(fn, service),
                                  declared.admin, declared.summary))
    return methods


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
