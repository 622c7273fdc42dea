"""velod's inference engine core: KV-cache block manager and continuous-batching scheduler.

Pure Python + NumPy: no I/O, no GPU, no asyncio. The daemon's engine component imports it
lazily and drives ``Scheduler.step()`` / ``Scheduler.complete_step()``.

The names below load on first use (PEP 562), so importing a submodule such as
``velod.engine.component`` does not pull in NumPy: an idle daemon and velodctl stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockManager": "velod.engine.block_manager",
    "DuplicateSequence": "velod.engine.errors",
    "EngineConfigError": "velod.engine.errors",
    "EngineError": "velod.engine.errors",
    "FinishedRequest": "velod.engine.sequence",
    "InvalidRequest": "velod.engine.errors",
    "OutOfBlocks": "velod.engine.errors",
    "OutOfSequenceSlots": "velod.engine.errors",
    "PAD_BLOCK": "velod.engine.block_manager",
    "PRIORITY_MAX": "velod.engine.scheduler_config",
    "PRIORITY_MIN": "velod.engine.scheduler_config",
    "QueueFull": "velod.engine.errors",
    "Scheduler": "velod.engine.scheduler",
    "SchedulerConfig": "velod.engine.scheduler_config",
    "SchedulerStats": "velod.engine.scheduler",
    "Sequence": "velod.engine.sequence",
    "SequenceState": "velod.engine.sequence",
    "SequenceTooLong": "velod.engine.errors",
    "SlotsNotReserved": "velod.engine.errors",
    "StepBatch": "velod.engine.step",
    "StepOrderError": "velod.engine.errors",
    "UnknownSequence": "velod.engine.errors",
}


__all__ = [
    "PAD_BLOCK",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "BlockManager",
    "DuplicateSequence",
    "EngineConfigError",
    "EngineError",
    "FinishedRequest",
    "InvalidRequest",
    "OutOfBlocks",
    "OutOfSequenceSlots",
    "QueueFull",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Sequence",
    "SequenceState",
    "SequenceTooLong",
    "SlotsNotReserved",
    "StepBatch",
    "StepOrderError",
    "UnknownSequence",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'velod.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
