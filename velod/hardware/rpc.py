"""Control methods of the hardware monitor: ``hardware.get`` and ``hardware.history``."""

from __future__ import annotations

from typing import Any

from velod.control.registry import CallContext, param, rpc
from velod.hardware.service import HardwareMonitor


@rpc("hardware.get", summary="Latest hardware snapshot and the health of each source (and "
     "why no GPU was found).")
async def get(monitor: HardwareMonitor, params: dict[str, Any], ctx: CallContext) -> Any:
    return await monitor.snapshot()


@rpc("hardware.history", summary="Recent samples of the key figures, oldest first; optional "
     "'limit'.")
async def history(monitor: HardwareMonitor, params: dict[str, Any], ctx: CallContext) -> Any:
    limit = param(params, "limit", int, None,
                  check=lambda v: None if v > 0 else "must be greater than 0")
    return monitor.history(limit)
