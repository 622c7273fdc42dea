"""velod's inference engine core: KV-cache block manager and continuous-batching scheduler.

Pure Python + NumPy: no I/O, no GPU, no asyncio. The daemon's engine component imports it
lazily and drives ``Scheduler.step()`` / ``Scheduler.complete_step()``.
"""

from velod.engine.block_manager import PAD_BLOCK, BlockManager
from velod.engine.errors import (
    DuplicateSequence,
    EngineConfigError,
    EngineError,
    InvalidRequest,
    OutOfBlocks,
    OutOfSequenceSlots,
    QueueFull,
    SequenceTooLong,
    SlotsNotReserved,
    StepOrderError,
    UnknownSequence,
)
from velod.engine.scheduler import Scheduler, SchedulerStats
from velod.engine.scheduler_config import PRIORITY_MAX, PRIORITY_MIN, SchedulerConfig
from velod.engine.sequence import FinishedRequest, Sequence, SequenceState
from velod.engine.step import StepBatch

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
