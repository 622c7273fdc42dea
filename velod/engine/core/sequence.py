"""A request as the scheduler tracks it: its whole token history and where it stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class SequenceState(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again (holds no blocks)
    PREFILLING = "prefilling"  # admitted; its tokens are being computed chunk by chunk
    DECODING = "decoding"  # every token but the last is in the cache; one token per step
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(slots=True, eq=False)
class Sequence:
    """One request. ``tokens`` (int32) is prompt + generated tokens: everything needed to
    recompute its KV cache after a preemption. While the request holds a block-table row,
    the scheduler's token buffer is the up-to-date copy (``Scheduler.token_ids``)."""

    id: int
    tokens: np.ndarray
    num_prompt_tokens: int
    max_new_tokens: int
    priority: int
    arrival: int  # submission order, the last tie-breaker
    sort_key: int  # effective priority, fixed at submit (see Scheduler docstring)
    eos_token_id: int | None = None
    state: SequenceState = SequenceState.WAITING
    row: int = -1  # block-table row while admitted
    admitted: int = -1  # admission order (victims: most recently admitted first)
    num_computed: int = 0  # while PREFILLING: tokens whose KV is scheduled into the cache
    retry_free: tuple[int, int] | None = None  # free blocks (both pools) when admission
    # last failed: skip until either pool has more
    num_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request that left the scheduler: why, and what it generated."""

    id: int
    # "length" (max_new_tokens reached), "stop" (an end-of-generation or stop token),
    # "aborted", or "error" (the step failed: ``error`` says how)
    reason: str
    output_token_ids: list[int]
    num_prompt_tokens: int
    num_preemptions: int
    error: str | None = None
