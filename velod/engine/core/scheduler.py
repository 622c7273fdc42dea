"""Continuous-batching scheduler: priorities with aging, chunked prefill, preemption.

The engine loop is ``batch = step()`` → run the model → ``complete_step(batch, tokens)``.

Each step decodes one token for every decoding sequence, continues chunked prefills, then
admits waiting requests, in heap order, while the batch has free rows (``max_batch_size``),
the step has token budget (``max_tokens_per_step``) and the free blocks can hold the head's
whole uncached prompt (the head is never overtaken, so a big request cannot starve). A
prompt longer than the budget is prefilled in chunks over several steps, so decode never
stalls behind it. Nothing is admitted in a step that had to preempt.

Waiting requests sit in a heap keyed by ``(sort_key, arrival)``. Aging is linear: after
``w`` steps of waiting a request's effective priority is ``priority - w / aging_steps``.
Comparing two requests at any step ``t`` by ``priority - (t - submit_step) / aging_steps``
orders them exactly like ``priority * aging_steps + submit_step``, a key fixed at submit:
the heap never needs re-keying, submit and admission stay O(log n), and since priorities
are bounded, a request is overtaken by at most the requests submitted within
``(PRIORITY_MAX - PRIORITY_MIN) * aging_steps`` steps after it, so nothing starves.

When a sequence needs a block and none is free, the running sequence with the worst
``(sort_key, admission order)`` (lowest priority, most recently admitted) is preempted by
recompute: its blocks are freed and it is queued again with its key and every token it
generated, to be prefilled again (prefix-cache hits usually recover most of it). A
sequence that is itself the worst preempts itself. Because a request that could not fit
in the whole cache is rejected at submit, the best running sequence can always proceed:
no deadlock.
"""

from __future__ import annotations

import array
import heapq
from collections.abc import Mapping
from collections.abc import Sequence as SequenceLike
from dataclasses import asdict, dataclass

import numpy as np

from velod.engine.core.block_manager import BlockManager
from velod.engine.core.errors import InvalidRequest, QueueFull, StepOrderError, UnknownSequence
from velod.engine.core.scheduler_config import PRIORITY_MAX, PRIORITY_MIN, SchedulerConfig
from velod.engine.core.sequence import FinishedRequest, Sequence, SequenceState
from velod.engine.core.step import StepBatch

_WAITING = SequenceState.WAITING
_PREFILLING = SequenceState.PREFILLING
_DECODING = SequenceState.DECODING
_TOKEN_MAX = 2**31 - 1  # token ids travel as int32
_NO_COPIES = np.zeros((0, 2), dtype=np.int32)
_NO_COPIES.flags.writeable = False


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Counters and gauges for status reports (plain data)."""

    steps: int
    waiting: int
    waiting_tokens: int
    running: int
    prefilling: int
    submitted: int
    finished: int
    aborted: int
    rejected: int
    preemptions: int
    generated_tokens: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    utilization: float

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class Scheduler:
    """Decides, step by step, which tokens of which requests the model processes."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config = config or SchedulerConfig()
        rows = config.max_batch_size
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            max_seqs=rows,
            max_seq_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            window=config.window,
            window_blocks=config.window_blocks,
        )
        # The longest chunk a sequence computes in one step (the window pool's limit).
        self._max_chunk = min(self.block_manager.max_chunk or config.max_tokens_per_step,
                              config.max_tokens_per_step)
        self._shift = config.block_size.bit_length() - 1
        self._mask = config.block_size - 1
        self._waiting: list[tuple[int, int, Sequence]] = []  # heap
        self._live: dict[int, Sequence] = {}  # waiting and running
        self._running: dict[int, Sequence] = {}
        self._prefilling: list[Sequence] = []  # admission order
        # Per block-table row (one per running sequence): what the decode path reads.
        self._row_seq: list[Sequence | None] = [None] * rows
        self._row_id = np.full(rows, -1, dtype=np.int64)
        self._decoding = np.zeros(rows, dtype=bool)
        self._last_token = np.zeros(rows, dtype=np.int32)
        # Shared read-only views for decode-only steps (query_lens, query_start_loc).
        self._ones = np.ones(rows, dtype=np.int32)
        self._counting = np.arange(rows + 1, dtype=np.int32)
        self._ones.flags.writeable = self._counting.flags.writeable = False
        # Token history of each row; np.zeros maps untouched pages lazily, so the real
        # footprint follows the sequences' actual lengths, not max_model_len.
        self._tokens = np.zeros((rows, config.max_model_len), dtype=np.int32)
        self._num_tokens = np.zeros(rows, dtype=np.int64)
        self._remaining = np.zeros(rows, dtype=np.int32)
        self._eos = np.full(rows, -1, dtype=np.int64)
        self._num_eos = 0  # running sequences with an eos token
        self._pending: StepBatch | None = None
        self._freed: list[int] = []
        self._step = 0
        self._next_id = 0
        self._admissions = 0
        self._num_waiting = 0
        self._waiting_tokens = 0
        self._submitted = self._finished = self._aborted = self._rejected = 0
        self._preemptions = 0
        self._generated = 0
        self._hit_tokens = self._query_tokens = 0

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: SequenceLike[int] | np.ndarray,
        max_new_tokens: int,
        *,
        priority: int = 0,
        eos_token_id: int | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises InvalidRequest or QueueFull."""
        config = self.config
        tokens = self._validate_prompt(prompt)
        num_prompt = len(tokens)
        _check_int("max_new_tokens", max_new_tokens, 1, config.max_model_len - num_prompt)
        _check_int("priority", priority, PRIORITY_MIN, PRIORITY_MAX)
        if eos_token_id is not None:
            _check_int("eos_token_id", eos_token_id, 0, self._max_token())
        # The last generated token is never fed back, so it needs no KV slot.
        blocks = (num_prompt + max_new_tokens - 1 + self._mask) >> self._shift
        if blocks > config.num_blocks:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({num_prompt}) + max_new_tokens ({max_new_tokens}) needs {blocks} KV "
                f"blocks but the whole cache has {config.num_blocks}",
                limit=config.num_blocks * config.block_size - num_prompt + 1,
            )
        if self._num_waiting >= config.max_waiting:
            self._rejected += 1
            raise QueueFull(
                f"{self._num_waiting} requests already waiting (max_waiting); retry later",
                "max_waiting", config.max_waiting,
            )
        if self._waiting_tokens + num_prompt > config.max_waiting_tokens:
            self._rejected += 1
            raise QueueFull(
                f"{self._waiting_tokens} prompt tokens already waiting, {num_prompt} more "
                f"would exceed max_waiting_tokens={config.max_waiting_tokens}; retry later",
                "max_waiting_tokens", config.max_waiting_tokens,
            )
        seq_id = self._next_id
        self._next_id += 1
        aging = config.aging_steps
        sort_key = priority * aging + self._step if aging else priority
        seq = Sequence(seq_id, tokens, num_prompt, max_new_tokens, priority, seq_id, sort_key,
                       eos_token_id)
        self._enqueue(seq)
        self._live[seq_id] = seq
        self._submitted += 1
        return seq_id

    def _validate_prompt(self, prompt: object) -> np.ndarray:
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or (prompt.size and prompt.dtype.kind not in "iu"):
                raise InvalidRequest("prompt", "must be a 1-D array of integer token ids")
            tokens = prompt.copy()  # the caller may reuse its array
        elif isinstance(prompt, list | tuple):
            try:  # strict and fast: ints only, within int32
                tokens = np.frombuffer(array.array("i", prompt), dtype=np.int32)
            except (TypeError, OverflowError):
                raise InvalidRequest(
                    "prompt", f"token ids must be integers in [0, {self._max_token()}]",
                    limit=self._max_token(),
                ) from None
        else:
            raise InvalidRequest("prompt", f"must be a list of token ids, not {type(prompt)}")
        if not len(tokens):
            raise InvalidRequest("prompt", "must hold at least one token id", limit=1)
        limit = self.config.max_model_len - 1
        if len(tokens) > limit:
            raise InvalidRequest(
                "prompt", f"has {len(tokens)} tokens; max_model_len={limit + 1} leaves room "
                f"for at most {limit} (one token must be generated)", limit=limit,
            )
        if tokens.min() < 0 or (
            (self.config.vocab_size is not None or tokens.dtype != np.int32)
            and tokens.max() > self._max_token()
        ):
            raise InvalidRequest(
                "prompt", f"token ids must be in [0, {self._max_token()}]",
                limit=self._max_token(),
            )
        return tokens.astype(np.int32, copy=False)

    def _max_token(self) -> int:
        vocab = self.config.vocab_size
        return _TOKEN_MAX if vocab is None else vocab - 1

    def abort(self, seq_id: int) -> bool:
        """Drop a waiting or running request, freeing its blocks now.

        Returns False when the id is not live (unknown, finished or already aborted).
        """
        seq = self._live.get(seq_id)
        if seq is None:
            return False
        if seq.state is _WAITING:
            seq.state = SequenceState.ABORTED
            del self._live[seq_id]
            self._num_waiting -= 1
            self._waiting_tokens -= len(seq.tokens)
            if len(self._waiting) > 64 and len(self._waiting) > 2 * self._num_waiting:
                self._waiting = [e for e in self._waiting if e[2].state is _WAITING]
                heapq.heapify(self._waiting)
        else:
            self._retire(seq, SequenceState.ABORTED)
        self._freed.append(seq_id)
        self._aborted += 1
        return True

    def fork(self, parent_id: int, *, max_new_tokens: int | None = None) -> int:
        """Start a decoding copy of a decoding request sharing all its blocks; returns its id.

        The child's output starts with the parent's tokens so far; a shared, partly filled
        last block is copied on the first write (see ``StepBatch.copies``).
        """
        if self._pending is not None:
            raise StepOrderError("fork() between step() and complete_step(); complete first")
        parent = self._live.get(parent_id)
        if parent is None or parent.state is not _DECODING:
            state = "unknown" if parent is None else parent.state.value
            raise UnknownSequence(parent_id, f"decoding request (it is {state})")
        limit = max_new_tokens if max_new_tokens is not None else parent.max_new_tokens
        generated = int(self._num_tokens[parent.row]) - parent.num_prompt_tokens
        _check_int("max_new_tokens", limit, generated + 1,
                   self.config.max_model_len - parent.num_prompt_tokens)
        if not self.block_manager.num_free_rows:
            raise QueueFull(
                f"all {self.config.max_batch_size} sequence slots are running",
                "max_batch_size", self.config.max_batch_size,
            )
        child_id = self._next_id
        self._next_id += 1
        child = Sequence(child_id, self.token_ids(parent_id), parent.num_prompt_tokens,
                         limit, parent.priority, child_id, parent.sort_key, parent.eos_token_id)
        row = self.block_manager.fork(parent_id, child_id)
        self._occupy(child, row)
        child.state = _DECODING
        child.num_computed = parent.num_computed
        self._decoding[row] = True
        self._live[child_id] = child
        self._submitted += 1
        return child_id

    # ------------------------------------------------------------------ stepping

    @property
    def has_work(self) -> bool:
        return bool(self._running) or self._num_waiting > 0

    def step(self) -> StepBatch:
        """Schedule the next batch. Call ``complete_step`` before stepping again."""
        if self._pending is not None:
            raise StepOrderError("step() called before complete_step() of the previous batch")
        self._step += 1
        bm = self.block_manager
        copies: list[tuple[int, int]] = []
        preempted: list[int] = []

        if bm.window_pool is not None:  # the last step is done: nothing reads these any more
            bm.slide_windows(np.flatnonzero(self._row_id >= 0))
        decode_rows = np.flatnonzero(self._decoding)
        if len(decode_rows):
            boundary = decode_rows[(bm.seq_lens(decode_rows) & self._mask) == 0]
            pending_copies = bm.copy_pending_rows()
            if not pending_copies and bm.can_grow(len(boundary)):
                if len(boundary):
                    bm.grow_rows(boundary)  # the common case: one new block each, in bulk
            else:
                for row in boundary.tolist() + pending_copies:
                    seq = self._row_seq[row]
                    if seq is not None and seq.state is _DECODING:
                        self._reserve(seq, 1, copies, preempted)
        budget = self.config.max_tokens_per_step - len(decode_rows)

        chunks: list[tuple[Sequence, int]] = []
        stalled = False
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.state is not _PREFILLING:
                continue  # preempted while scheduling this step
            chunk = min(len(seq.tokens) - seq.num_computed, budget, self._max_chunk)
            if self._reserve(seq, chunk, copies, preempted):
                chunks.append((seq, chunk))
                budget -= chunk
            else:
                stalled = True
        if not stalled and not preempted:  # memory is tight: admit nothing this step
            budget = self._admit(budget, chunks, copies)

        if preempted:
            decode_rows = np.flatnonzero(self._decoding)
            chunks = [(seq, n) for seq, n in chunks if seq.state is _PREFILLING]
        finished = tuple(self._freed)
        self._freed.clear()
        if not len(decode_rows) and not chunks:
            bm.take_window_copies()  # only for sequences preempted meanwhile: nothing to copy
            return StepBatch.empty(self._step, tuple(preempted), finished)
        batch = self._build(decode_rows, chunks, copies, tuple(preempted), finished)
        self._pending = batch
        return batch

    def _admit(
        self, budget: int, chunks: list[tuple[Sequence, int]], copies: list[tuple[int, int]]
    ) -> int:
        bm = self.block_manager
        waiting = self._waiting
        while budget > 0 and waiting and bm.num_free_rows:
            seq = waiting[0][2]
            if seq.state is not _WAITING:
                heapq.heappop(waiting)  # aborted while waiting
                continue
            free = bm.free_counts()
            if seq.retry_free is not None and free[0] <= seq.retry_free[0] and \
                    free[1] <= seq.retry_free[1]:
                break  # did not fit last time and nothing was freed since
            row = bm.add(seq.id, seq.tokens)
            cached = bm.seq_len(seq.id)
            chunk = min(len(seq.tokens) - cached, budget, self._max_chunk)
            # The whole prompt must fit the full pool; the window pool needs the first chunk
            # (later chunks release what their window leaves behind).
            if bm.blocks_needed_row(row, len(seq.tokens) - cached) > bm.num_free_blocks or \
                    bm.window_blocks_needed_row(row, chunk) > bm.num_free_window_blocks:
                bm.free(seq.id)
                seq.retry_free = bm.free_counts()
                break  # strict order: nothing overtakes the head, so it cannot starve
            heapq.heappop(waiting)
            self._num_waiting -= 1
            self._waiting_tokens -= len(seq.tokens)
            self._hit_tokens += cached
            self._query_tokens += len(seq.tokens)
            seq.retry_free = None
            seq.state = _PREFILLING
            seq.num_computed = cached
            self._occupy(seq, row)
            self._prefilling.append(seq)
            copies.extend(bm.ensure_row(row, chunk))
            chunks.append((seq, chunk))
            budget -= chunk
        return budget

    def _reserve(
        self, seq: Sequence, num_tokens: int, copies: list[tuple[int, int]], preempted: list[int]
    ) -> bool:
        """Reserve slots for ``seq``, preempting the worst running sequences if needed.

        Returns False when ``seq`` itself was the one preempted.
        """
        bm = self.block_manager
        while not bm.fits_row(seq.row, num_tokens):
            victim = max(self._running.values(), key=_victim_order)
            self._preempt(victim)
            preempted.append(victim.id)
            if victim is seq:
                return False
        copies.extend(bm.ensure_row(seq.row, num_tokens))
        return True

    def _build(
        self,
        decode_rows: np.ndarray,
        chunks: list[tuple[Sequence, int]],
        copies: list[tuple[int, int]],
        preempted: tuple[int, ...],
        finished: tuple[int, ...],
    ) -> StepBatch:
        bm = self.block_manager
        num_decode = len(decode_rows)
        token_ids = self._last_token[decode_rows]
        if chunks:
            prefill_rows = np.fromiter((s.row for s, _ in chunks), np.int64, len(chunks))
            prefill_lens = np.fromiter((n for _, n in chunks), np.int32, len(chunks))
            rows = np.concatenate((decode_rows, prefill_rows))
            query_lens = np.concatenate((np.ones(num_decode, np.int32), prefill_lens))
            positions, slots = bm.append_rows(rows, query_lens)
            token_rows = np.repeat(rows, query_lens)
            parts = [token_ids]
            sampled: list[int] = []
            for index, (seq, n) in enumerate(chunks, num_decode):
                start = seq.num_computed
                parts.append(self._tokens[seq.row, start : start + n])
                seq.num_computed = start + n
                if seq.num_computed == len(seq.tokens):
                    sampled.append(index)
                    seq.state = _DECODING
                    self._decoding[seq.row] = True
                    self._prefilling.remove(seq)
            token_ids = np.concatenate(parts)
            query_start = np.zeros(len(rows) + 1, np.int32)
            np.cumsum(query_lens, out=query_start[1:])
            sample_pos = np.array(sampled, dtype=np.int64)
            sample_rows = np.concatenate((decode_rows, rows[sample_pos]))
            sample_indices = np.concatenate(
                (np.arange(num_decode, dtype=np.int32), query_start[sample_pos + 1] - 1)
            )
            full = positions[query_start[1:] - 1] & self._mask == self._mask
            full[num_decode:] = True  # a chunk may fill several blocks: let the manager see
            commit_rows = rows[full]
        else:  # decode only: every row was just given room (grow_rows / _reserve)
            rows = decode_rows
            positions, slots = bm.append_rows(rows, check=False)
            token_rows = rows
            query_lens = self._ones[:num_decode]
            query_start = self._counting[: num_decode + 1]
            sample_rows = decode_rows
            sample_indices = query_start[:-1]
            commit_rows = decode_rows[positions & self._mask == self._mask]
        context_lens = bm.seq_lens(rows)
        width = (int(context_lens.max()) + self._mask) >> self._shift
        row_ids = self._row_id
        seq_ids = row_ids[rows]
        window_copies = bm.take_window_copies()
        return StepBatch(
            step=self._step,
            seq_ids=seq_ids,
            num_decode=num_decode,
            query_lens=query_lens,
            query_start_loc=query_start,
            context_lens=context_lens,
            block_tables=bm.block_tables(rows, width),
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slots,
            sample_indices=sample_indices,
            sample_seq_ids=seq_ids if sample_rows is rows else row_ids[sample_rows],
            copies=np.array(copies, dtype=np.int32) if copies else _NO_COPIES,
            preempted=preempted,
            finished=finished,
            sample_rows=sample_rows,
            commit_rows=commit_rows,
            commit_ids=row_ids[commit_rows],
            window_block_tables=bm.window_block_tables(rows, width),
            window_slot_mapping=bm.window_slots(token_rows, positions),
            window_copies=(np.array(window_copies, dtype=np.int32) if window_copies
                           else _NO_COPIES),
        )

    def complete_step(
        self, batch: StepBatch, new_token_ids: np.ndarray | SequenceLike[int] | Mapping[int, int],
        *, stop: np.ndarray | None = None,
    ) -> list[FinishedRequest]:
        """Feed back one sampled token per ``batch.sample_seq_ids`` (in that order, or as a
        mapping id -> token); returns the requests that finished with it. ``stop`` (bool, in
        the same order) finishes those requests now, reason "stop": their token ended them
        (an end-of-generation or stop token the caller recognised)."""
        if batch is not self._pending:
            raise StepOrderError("complete_step() needs the batch returned by the last step()")
        tokens = self._coerce_tokens(batch.sample_seq_ids, new_token_ids)
        self._pending = None
        bm = self.block_manager
        row_seq = self._row_seq
        # The KV of this step is in the cache now: its full blocks become reusable prefixes.
        if bm.enable_prefix_caching and len(batch.commit_rows):
            commit = batch.commit_rows
            live_commit = self._row_id[commit] == batch.commit_ids
            bm.cache_last_blocks_rows(commit[live_commit], self._tokens)
        rows = batch.sample_rows
        live = self._row_id[rows] == batch.sample_seq_ids
        if stop is not None and stop.shape != tokens.shape:
            raise InvalidRequest("stop", f"need {len(tokens)} flags (one per sample_seq_ids)")
        if not live.all():  # aborted since step()
            rows, tokens = rows[live], tokens[live]
            stop = None if stop is None else stop[live]
        self._last_token[rows] = tokens
        counts = self._num_tokens[rows]
        self._tokens[rows, counts] = tokens
        self._num_tokens[rows] = counts + 1
        remaining = self._remaining[rows] - 1
        self._remaining[rows] = remaining
        done = remaining <= 0
        stopped = np.zeros(len(rows), bool) if stop is None else stop.astype(bool, copy=True)
        if self._num_eos:
            stopped |= tokens == self._eos[rows]
        done |= stopped
        self._generated += len(rows)
        if not done.any():
            return []
        results = []
        for row, by_token in zip(rows[done].tolist(), stopped[done].tolist(), strict=True):
            seq = row_seq[row]
            if seq is None:  # cannot happen: rows were checked live above
                continue
            reason = "stop" if by_token else "length"
            results.append(self._retire(seq, SequenceState.FINISHED, reason))
            self._freed.append(seq.id)
            self._finished += 1
        return results

    def _coerce_tokens(
        self, ids: np.ndarray, new_token_ids: np.ndarray | SequenceLike[int] | Mapping[int, int]
    ) -> np.ndarray:
        if isinstance(new_token_ids, Mapping):
            missing = [i for i in ids.tolist() if i not in new_token_ids]
            if missing:
                raise InvalidRequest("new_token_ids", f"no token for sequences {missing}")
            tokens = np.fromiter((new_token_ids[i] for i in ids.tolist()), np.int64, len(ids))
        else:
            tokens = np.asarray(new_token_ids)
            if tokens.shape != ids.shape or (tokens.size and tokens.dtype.kind not in "iu"):
                raise InvalidRequest(
                    "new_token_ids",
                    f"need {len(ids)} integer token ids (one per sample_seq_ids), "
                    f"got shape {tokens.shape} of {tokens.dtype}",
                )
        if tokens.size and (tokens.min() < 0 or tokens.max() > self._max_token()):
            raise InvalidRequest("new_token_ids", f"token ids must be in [0, {self._max_token()}]")
        return tokens

    # ------------------------------------------------------------------ state changes

    def _enqueue(self, seq: Sequence) -> None:
        seq.state = _WAITING
        heapq.heappush(self._waiting, (seq.sort_key, seq.arrival, seq))
        self._num_waiting += 1
        self._waiting_tokens += len(seq.tokens)

    def _occupy(self, seq: Sequence, row: int) -> None:
        seq.row = row
        self._admissions += 1
        seq.admitted = self._admissions
        self._running[seq.id] = seq
        self._row_seq[row] = seq
        self._row_id[row] = seq.id
        count = len(seq.tokens)
        self._tokens[row, :count] = seq.tokens
        self._num_tokens[row] = count
        self._last_token[row] = seq.tokens[-1]
        self._remaining[row] = seq.max_new_tokens - (count - seq.num_prompt_tokens)
        if seq.eos_token_id is not None:
            self._eos[row] = seq.eos_token_id
            self._num_eos += 1

    def _vacate(self, seq: Sequence) -> None:
        row = seq.row
        seq.tokens = self._tokens[row, : self._num_tokens[row]].copy()
        self.block_manager.free(seq.id)
        if seq.state is _PREFILLING:
            self._prefilling.remove(seq)
        del self._running[seq.id]
        self._row_seq[row] = None
        self._row_id[row] = -1
        self._decoding[row] = False
        if seq.eos_token_id is not None:
            self._eos[row] = -1
            self._num_eos -= 1
        seq.row = -1

    def _preempt(self, seq: Sequence) -> None:
        self._vacate(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self._preemptions += 1
        self._enqueue(seq)  # keeps its key: it goes back near the head of the queue

    def _retire(
        self, seq: Sequence, state: SequenceState, reason: str = "aborted"
    ) -> FinishedRequest:
        self._vacate(seq)
        seq.state = state
        del self._live[seq.id]
        return FinishedRequest(seq.id, reason, seq.tokens[seq.num_prompt_tokens :].tolist(),
                               seq.num_prompt_tokens, seq.num_preemptions)

    # ------------------------------------------------------------------ queries

    def state(self, seq_id: int) -> SequenceState:
        """State of a live request (raises UnknownSequence once it finished)."""
        seq = self._live.get(seq_id)
        if seq is None:
            raise UnknownSequence(seq_id, "request")
        return seq.state

    def sequence(self, seq_id: int) -> Sequence:
        """The live request (read-only view: do not mutate)."""
        seq = self._live.get(seq_id)
        if seq is None:
            raise UnknownSequence(seq_id, "request")
        return seq

    def token_ids(self, seq_id: int) -> np.ndarray:
        """A live request's tokens so far (prompt + generated), int32 copy."""
        seq = self.sequence(seq_id)
        if seq.row >= 0:
            return self._tokens[seq.row, : self._num_tokens[seq.row]].copy()
        return seq.tokens.copy()

    def running_ids(self) -> list[int]:
        return list(self._running)

    def waiting_ids(self) -> list[int]:
        """Waiting request ids in the order they would be admitted."""
        entries = sorted(e for e in self._waiting if e[2].state is _WAITING)
        return [seq.id for _, _, seq in entries]

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            steps=self._step,
            waiting=self._num_waiting,
            waiting_tokens=self._waiting_tokens,
            running=len(self._running),
            prefilling=len(self._prefilling),
            submitted=self._submitted,
            finished=self._finished,
            aborted=self._aborted,
            rejected=self._rejected,
            preemptions=self._preemptions,
            generated_tokens=self._generated,
            prefix_hit_tokens=self._hit_tokens,
            prefix_query_tokens=self._query_tokens,
            blocks_total=bm.num_blocks,
            blocks_used=bm.num_used_blocks,
            blocks_free=bm.num_free_blocks,
            blocks_cached=bm.num_cached_blocks,
            utilization=bm.utilization,
        )


def _victim_order(seq: Sequence) -> tuple[int, int]:
    return seq.sort_key, seq.admitted


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(field, f"must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidRequest(field, f"{value} is outside [{low}, {high}]", limit=(low, high))
