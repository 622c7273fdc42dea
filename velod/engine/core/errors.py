"""Typed errors of the engine core: every failure says what, which value and what to do."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error raised by the engine core."""


class EngineConfigError(EngineError, ValueError):
    """A scheduler or block-manager setting is out of range."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class InvalidRequest(EngineError, ValueError):
    """A submitted request breaks a rule; ``field`` names the offending field."""

    def __init__(self, field: str, message: str, limit: object = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.limit = limit


class QueueFull(EngineError):
    """Back-pressure: the waiting queue (or the sequence slots) are full; retry later."""

    def __init__(self, message: str, limit: str, value: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


class OutOfBlocks(EngineError):
    """The KV cache has fewer free blocks than an operation needs (nothing was changed)."""

    def __init__(self, needed: int, free: int, total: int) -> None:
        super().__init__(
            f"out of KV blocks: need {needed}, {free} free of {total}; free a sequence, "
            "preempt one, or configure a larger KV cache"
        )
        self.needed = needed
        self.free = free
        self.total = total


class OutOfSequenceSlots(EngineError):
    """Every sequence slot (row of the block table) is taken."""

    def __init__(self, max_seqs: int) -> None:
        super().__init__(f"all {max_seqs} sequence slots are in use; free a sequence first")
        self.max_seqs = max_seqs


class SequenceTooLong(EngineError):
    """A sequence would need more blocks than a block-table row holds."""

    def __init__(self, seq_id: int, tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"sequence {seq_id} would hold {tokens} tokens, more than the {max_tokens} a block "
            "table row can map (max_seq_len)"
        )
        self.seq_id = seq_id
        self.tokens = tokens
        self.max_tokens = max_tokens


class UnknownSequence(EngineError, LookupError):
    """No sequence (block manager) or live request (scheduler) has this id."""

    def __init__(self, seq_id: int, what: str = "sequence") -> None:
        super().__init__(f"unknown {what} {seq_id!r}")
        self.seq_id = seq_id


class DuplicateSequence(EngineError):
    """A sequence id is already registered with the block manager."""

    def __init__(self, seq_id: int) -> None:
        super().__init__(f"sequence {seq_id!r} is already registered")
        self.seq_id = seq_id


class SlotsNotReserved(EngineError):
    """Tokens were appended to a sequence without reserving blocks for them first."""

    def __init__(self, seq_ids: list[int]) -> None:
        super().__init__(
            f"sequences {seq_ids} have no reserved slots for the appended tokens; "
            "call ensure() first"
        )
        self.seq_ids = seq_ids


class StepOrderError(EngineError):
    """``step()`` and ``complete_step()`` were called out of order."""
