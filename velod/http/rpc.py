"""Control methods of the HTTP server: ``http.status``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.control.registry import CallContext, rpc

if TYPE_CHECKING:
    from velod.http.service import HttpServer


@rpc("http.status", summary="Where the HTTP APIs listen (url), state, whether a key is needed")
async def status(http: HttpServer, params: dict[str, Any], ctx: CallContext) -> Any:
    return http.status()
