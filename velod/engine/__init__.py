"""velod's inference engine core: KV-cache block manager and continuous-batching scheduler.

Pure Python + NumPy: no I/O, no GPU, no asyncio. The daemon's engine component imports it
lazily and drives ``Scheduler.step()`` / ``Scheduler.complete_step()``.

The names below load on first use (PEP 562), so importing a submodule such as
``velod.engine.service`` does not pull in NumPy: an idle daemon and velodctl stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockManager": "velod.engine.core.block_manager",
    "DuplicateSequence": "velod.engine.core.errors",
    "EngineConfigError": "velod.engine.core.errors",
    "EngineError": "velod.engine.core.errors",
    "FinishedRequest": "velod.engine.core.sequence",
    "InvalidRequest": "velod.engine.core.errors",
    "OutOfBlocks": "velod.engine.core.errors",
    "OutOfSequenceSlots": "velod.engine.core.errors",
    "PAD_BLOCK": "velod.engine.core.block_manager",
    "PRIORITY_MAX": "velod.engine.core.scheduler_config",
    "PRIORITY_MIN": "velod.engine.core.scheduler_config",
    "QueueFull": "velod.engine.core.errors",
    "Scheduler": "velod.engine.core.scheduler",
    "SchedulerConfig": "velod.engine.core.scheduler_config",
    "SchedulerStats": "velod.engine.core.scheduler",
    "Sequence": "velod.engine.core.sequence",
    "SequenceState": "velod.engine.core.sequence",
    "SequenceTooLong": "velod.engine.core.errors",
    "SlotsNotReserved": "velod.engine.core.errors",
    "StepBatch": "velod.engine.core.step",
    "StepOrderError": "velod.engine.core.errors",
    "UnknownSequence": "velod.engine.core.errors",
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
