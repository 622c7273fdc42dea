"""The daemon's own control methods: ``system.*``, ``config.*`` and ``events.subscribe``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from velod.config_file import LaneBusy
from velod.control.registry import CallContext, RpcError, param, rpc
from velod.topics import TOPICS, unmatched

if TYPE_CHECKING:
    from velod.daemon import Daemon


@rpc("system.hello", summary="name, version, protocol, methods")
async def hello(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    return daemon.hello(ctx.peer.admin)


@rpc("system.ping", summary="liveness check")
async def ping(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    return {"pong": True, "time": time.time()}


@rpc("system.status", summary="daemon and component status")
async def status(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    return daemon.status()


@rpc("system.shutdown", admin=True, summary="stop velod")
async def shutdown(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    daemon.request_stop(after=0.05)  # after the reply is on its way
    return {"stopping": True}


@rpc("config.get", summary="the running config")
async def config_get(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    return daemon.running_config()


@rpc("config.validate", summary="validate config text")
async def config_validate(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    # Open to everyone: checked off the loop, one at a time, bounded in time.
    text, name = param(params, "text", str), param(params, "name", str, "<text>")
    try:
        return await daemon.validate(text, name, admin=ctx.peer.admin)
    except LaneBusy as exc:
        raise RpcError("busy", f"config.validate: {exc}; try again shortly") from None
    except TimeoutError:
        raise RpcError("unavailable", "config.validate: the check took longer than "
                       f"{daemon.checks.timeout:g}s and was abandoned") from None


@rpc("config.reload", admin=True,
     summary="reload the config file; returns once applied or refused")
async def config_reload(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    return await daemon.reload("control request")


@rpc("events.subscribe", summary="stream events as 'event' notifications")
async def subscribe(daemon: Daemon, params: dict[str, Any], ctx: CallContext) -> Any:
    topics = param(params, "topics", list, ["*"])
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise RpcError("invalid_params", "topics must be a non-empty list of strings such as "
                       "'hardware.*' or '*'", {"field": "topics"})
    ctx.streaming = True  # type: ignore[misc]

    def forward(event: Any) -> None:
        if not ctx.notify("event", [event.to_wire()]):
            unsubscribe()

    unsubscribe = daemon.bus.subscribe(topics, forward)
    ctx.on_close(unsubscribe)
    return {"subscribed": topics, "unmatched": unmatched(topics), "known": sorted(TOPICS)}
