"""What one scheduler step hands to the model runner: NumPy arrays for a kernel launch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_EMPTY_I32 = np.zeros(0, dtype=np.int32)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_NO_COPIES = np.zeros((0, 2), dtype=np.int32)
_NO_COPIES.flags.writeable = False


@dataclass(frozen=True, slots=True, eq=False)
class StepBatch:
    """The work of one step.

    Sequences come **decode first**: rows ``[:num_decode]`` each process exactly one token
    (their latest), rows ``[num_decode:]`` are prefill chunks (``query_lens`` tokens each).
    Token arrays are flat, in that sequence order; ``query_start_loc`` delimits each
    sequence's tokens. Before running attention, perform ``copies`` (copy-on-write block
    copies ``(src, dst)``) and write the new K/V at ``slot_mapping``
    (``slot = block * block_size + offset``). ``context_lens`` count the tokens in the
    cache *including* those written this step; ``block_tables`` is padded with block 0
    beyond each sequence's blocks. Sample one token from the output at each
    ``sample_indices`` (a flat token index) and pass them, in that order, to
    ``Scheduler.complete_step``.

    A model with sliding-window layers keeps their K/V in a second pool: those layers write
    at ``window_slot_mapping``, read through ``window_block_tables`` (entries before each
    sequence's window are released and hold block 0: never read) and copy
    ``window_copies`` first. All three are None / empty without a window pool.
    """

    step: int
    seq_ids: np.ndarray  # int64 [num_seqs]
    num_decode: int
    query_lens: np.ndarray  # int32 [num_seqs]
    query_start_loc: np.ndarray  # int32 [num_seqs + 1]
    context_lens: np.ndarray  # int32 [num_seqs]
    block_tables: np.ndarray  # int32 [num_seqs, max_blocks]
    token_ids: np.ndarray  # int32 [num_tokens]
    positions: np.ndarray  # int32 [num_tokens]
    slot_mapping: np.ndarray  # int32 [num_tokens]
    sample_indices: np.ndarray  # int32 [num_samples]
    sample_seq_ids: np.ndarray  # int64 [num_samples]
    copies: np.ndarray  # int32 [num_copies, 2]
    preempted: tuple[int, ...]  # requeued while scheduling this step (blocks freed)
    finished: tuple[int, ...]  # finished or aborted since the previous step (blocks freed)
    sample_rows: np.ndarray  # scheduler bookkeeping: block-table rows of sample_seq_ids
    commit_rows: np.ndarray  # scheduler bookkeeping: rows whose blocks fill up this step
    commit_ids: np.ndarray  # scheduler bookkeeping: their sequence ids
    window_block_tables: np.ndarray | None = None  # int32 [num_seqs, max_blocks]
    window_slot_mapping: np.ndarray | None = None  # int32 [num_tokens]
    window_copies: np.ndarray = field(default_factory=lambda: _NO_COPIES)  # int32 [n, 2]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_prefill(self) -> int:
        return len(self.seq_ids) - self.num_decode

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_empty(self) -> bool:
        return len(self.seq_ids) == 0

    @classmethod
    def empty(cls, step: int, preempted: tuple[int, ...], finished: tuple[int, ...]) -> StepBatch:
        return cls(
            step=step,
            seq_ids=_EMPTY_I64,
            num_decode=0,
            query_lens=_EMPTY_I32,
            query_start_loc=np.zeros(1, dtype=np.int32),
            context_lens=_EMPTY_I32,
            block_tables=np.zeros((0, 0), dtype=np.int32),
            token_ids=_EMPTY_I32,
            positions=_EMPTY_I32,
            slot_mapping=_EMPTY_I32,
            sample_indices=_EMPTY_I32,
            sample_seq_ids=_EMPTY_I64,
            copies=np.zeros((0, 2), dtype=np.int32),
            preempted=preempted,
            finished=finished,
            sample_rows=_EMPTY_I64,
            commit_rows=_EMPTY_I64,
            commit_ids=_EMPTY_I64,
        )
