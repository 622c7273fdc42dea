"""Stateful property test of the scheduler + block manager against a shadow KV cache.

A stand-in model writes each step's token ids into a shadow cache exactly where the step
says (after the copy-on-write copies), and checks that every sequence's context, read back
through its block table, is its own token history. That catches a wrong slot, a wrong
prefix-cache hit, a missed copy-on-write or a block freed while in use. Block accounting
is checked after every operation; at teardown the workload must drain, every request
receiving exactly its max_new_tokens.

With a sliding window, a second shadow cache stands for the windowed layers' pool: every
token a query can see through its window must read back as its own history through the
window block table, only from blocks the sequence still holds, and a sequence holds no more
than its window (plus the chunk being computed) of them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from velod.engine import (
    InvalidRequest,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    StepBatch,
)

BLOCK = 4
MODEL_LEN = 40
# A few prompts sharing prefixes (some a whole number of blocks long), submitted again and
# again, so prefix-cache hits, full-prompt hits and shared blocks happen all the time.
POOL = (
    [1, 2, 3, 0],
    [1, 2, 3, 0, 2, 2, 1, 1],
    [1, 2, 3, 0, 2, 2, 1, 1, 3],
    [1, 2, 3, 0, 2, 2, 1, 1, 3, 3, 3, 3],
    [1, 2, 3, 0, 2, 2, 1, 0, 3, 3, 3, 3, 1],
    [0] * 13,
    [2],
)
PROMPTS = st.sampled_from(POOL) | st.lists(st.integers(0, 3), min_size=1, max_size=20)


class EngineMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(6, 24),
        max_batch=st.integers(1, 4),
        extra_tokens=st.integers(0, 12),
        prefix_caching=st.booleans(),
        aging=st.sampled_from([0, 1, 3]),
        window=st.none() | st.integers(1, 12),
        extra_window_blocks=st.integers(0, 10),
    )
    def setup(
        self, num_blocks: int, max_batch: int, extra_tokens: int, prefix_caching: bool,
        aging: int, window: int | None, extra_window_blocks: int,
    ) -> None:
        self.num_blocks = num_blocks
        self.window = window
        # The fewest blocks that hold one sequence's window, and up to 10 more.
        self.window_blocks = (-(-(window - 1) // BLOCK) + 2 + extra_window_blocks
                              if window else 0)
        self.s = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=BLOCK, max_batch_size=max_batch,
            max_tokens_per_step=max_batch + extra_tokens, max_model_len=MODEL_LEN,
            max_waiting=12, aging_steps=aging, enable_prefix_caching=prefix_caching,
            window=window, window_blocks=self.window_blocks,
        ))
        self.kv = np.full(num_blocks * BLOCK, -1, dtype=np.int64)
        self.window_kv = np.full(self.window_blocks * BLOCK, -1, dtype=np.int64)
        self.history: dict[int, list[int]] = {}
        self.prompt_len: dict[int, int] = {}
        self.max_new: dict[int, int] = {}
        self.done: dict[int, list[int]] = {}
        self.aborted: set[int] = set()

    # ------------------------------------------------------------------ rules

    @rule(prompt=PROMPTS, max_new=st.integers(1, 10), priority=st.integers(-2, 2))
    def submit(self, prompt: list[int], max_new: int, priority: int) -> None:
        try:
            seq_id = self.s.submit(prompt, max_new, priority=priority)
        except InvalidRequest:
            slots = len(prompt) + max_new - 1
            assert len(prompt) + max_new > MODEL_LEN or slots > self.num_blocks * BLOCK
            return
        except QueueFull:
            assert self.s.num_waiting >= 12
            return
        self.history[seq_id] = list(prompt)
        self.prompt_len[seq_id] = len(prompt)
        self.max_new[seq_id] = max_new

    @precondition(lambda self: self.s.has_work)
    @rule(abort_pick=st.none() | st.none() | st.integers(0, 50))
    def step(self, abort_pick: int | None) -> None:
        self.broken = True  # stays set if a check fails: teardown then does not pile on
        self._step(abort_pick)
        self.broken = False

    @precondition(lambda self: self._live())
    @rule(pick=st.integers(0, 50))
    def abort(self, pick: int) -> None:
        live = self._live()
        seq_id = live[pick % len(live)]
        assert self.s.abort(seq_id)
        self.aborted.add(seq_id)

    @precondition(lambda self: self._decoding() and self.s.block_manager.num_free_rows)
    @rule(pick=st.integers(0, 50))
    def fork(self, pick: int) -> None:
        decoding = self._decoding()
        parent = decoding[pick % len(decoding)]
        child = self.s.fork(parent)
        self.history[child] = list(self.history[parent])
        self.prompt_len[child] = self.prompt_len[parent]
        self.max_new[child] = self.max_new[parent]

    # ------------------------------------------------------------------ the stand-in model

    def _decoding(self) -> list[int]:
        return [i for i in self.s.running_ids() if self.s.state(i) is SequenceState.DECODING]

    def _live(self) -> list[int]:
        return [i for i in self.history if i not in self.done and i not in self.aborted]

    def _step(self, abort_pick: int | None = None) -> None:
        order = {i: (self.s.sequence(i).sort_key, self.s.sequence(i).admitted)
                 for i in self.s.running_ids()}
        batch = self.s.step()
        for victim in batch.preempted:  # always the lowest priority, most recently admitted
            assert order[victim] == max(order.values())
            del order[victim]
        if batch.is_empty:
            return
        self._run_model(batch)
        if abort_pick is not None:  # abort between step() and complete_step()
            live = self._live()
            seq_id = live[abort_pick % len(live)]
            assert self.s.abort(seq_id)
            self.aborted.add(seq_id)
        ids = batch.sample_seq_ids.tolist()
        new = [(i * 3 + len(self.history[i])) % 4 for i in ids]  # small alphabet: shared blocks
        finished = self.s.complete_step(batch, new)
        for seq_id, token in zip(ids, new, strict=True):
            if seq_id not in self.aborted:
                self.history[seq_id].append(token)
                generated = len(self.history[seq_id]) - self.prompt_len[seq_id]
                assert generated <= self.max_new[seq_id]
        for request in finished:
            expected = self.history[request.id][self.prompt_len[request.id] :]
            assert request.reason == "length"
            assert request.output_token_ids == expected
            assert len(expected) == self.max_new[request.id]
            self.done[request.id] = expected

    def _run_model(self, batch: StepBatch) -> None:
        for src, dst in batch.copies.tolist():
            self.kv[dst * BLOCK : (dst + 1) * BLOCK] = self.kv[src * BLOCK : (src + 1) * BLOCK]
        self.kv[batch.slot_mapping] = batch.token_ids
        assert len(set(batch.slot_mapping.tolist())) == batch.num_tokens
        if self.window:
            for src, dst in batch.window_copies.tolist():
                self.window_kv[dst * BLOCK:(dst + 1) * BLOCK] = \
                    self.window_kv[src * BLOCK:(src + 1) * BLOCK]
            assert batch.window_slot_mapping is not None
            self.window_kv[batch.window_slot_mapping] = batch.token_ids
            assert len(set(batch.window_slot_mapping.tolist())) == batch.num_tokens
        else:
            assert batch.window_block_tables is None and batch.window_slot_mapping is None
        assert batch.num_tokens <= self.s.config.max_tokens_per_step
        assert batch.num_seqs <= self.s.config.max_batch_size
        assert (batch.query_lens[: batch.num_decode] == 1).all()
        assert (batch.query_lens >= 1).all()
        sampled = dict(zip(batch.sample_seq_ids.tolist(), batch.sample_indices.tolist(),
                           strict=True))
        for i, seq_id in enumerate(batch.seq_ids.tolist()):
            history = self.history[seq_id]
            start, count = batch.query_start_loc[i], batch.query_lens[i]
            context = int(batch.context_lens[i])
            positions = batch.positions[start : start + count].tolist()
            assert positions == list(range(context - count, context))
            assert batch.token_ids[start : start + count].tolist() == history[context - count :
                                                                              context]
            pos = np.arange(context)
            slots = batch.block_tables[i, pos // BLOCK] * BLOCK + pos % BLOCK
            assert self.kv[slots].tolist() == history[:context], "context does not match"
            if self.window:
                self._check_window(batch, i, history, context, count)
            if seq_id in sampled:  # sample from its last token, once all are in the cache
                assert sampled.pop(seq_id) == start + count - 1
                assert context == len(history)
            else:
                assert context < len(history)
        assert not sampled

    def _check_window(self, batch: StepBatch, i: int, history: list[int], context: int,
                      count: int) -> None:
        """What the windowed layers read for sequence ``i``: its first query sees from
        ``first - window + 1``; every position from there is its own token, in a block it
        holds (never one freed or cached for reuse), and it holds no more than it needs."""
        pool = self.s.block_manager.window_pool
        assert pool is not None and self.window is not None
        lo = max(context - count - self.window + 1, 0)
        pos = np.arange(lo, context)
        tables = batch.window_block_tables
        assert tables is not None
        blocks = tables[i, pos // BLOCK]
        free = set(pool.free_block_ids()) | set(pool.cached_block_ids())
        for block in set(blocks.tolist()):
            assert pool.ref_count(block) >= 1 and block not in free, "reads a released block"
        slots = blocks * BLOCK + pos % BLOCK
        assert self.window_kv[slots].tolist() == history[lo:context], "window does not match"
        first, held = self.s.block_manager.window_block_table(int(batch.seq_ids[i]))
        assert first <= lo // BLOCK
        assert len(held) <= pool.blocks_for_chunk(count), "holds blocks its window left behind"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        bm = self.s.block_manager
        holders: Counter[int] = Counter()
        for seq_id in bm.seq_ids():
            blocks = bm.block_ids(seq_id)
            assert len(set(blocks)) == len(blocks)
            holders.update(blocks)
        free, cached = bm.free_block_ids(), bm.cached_block_ids()
        assert len(set(free)) == len(free) and not set(free) & set(cached)
        for block in range(self.num_blocks):
            assert bm.ref_count(block) == holders[block]
            assert (holders[block] == 0) == (block in free or block in cached)
        assert bm.num_free_blocks + bm.num_used_blocks == self.num_blocks
        pool = bm.window_pool
        if pool is None:
            return
        holders = Counter()
        for seq_id in bm.seq_ids():
            _, blocks = bm.window_block_table(seq_id)
            assert len(set(blocks.tolist())) == len(blocks)
            holders.update(blocks.tolist())
        free, cached = pool.free_block_ids(), pool.cached_block_ids()
        assert len(set(free)) == len(free) and not set(free) & set(cached)
        for block in range(self.window_blocks):
            assert pool.ref_count(block) == holders[block]
            assert (holders[block] == 0) == (block in free or block in cached)

    @invariant()
    def running_sequences_have_slots_for_their_tokens(self) -> None:
        bm = self.s.block_manager
        assert set(bm.seq_ids()) == set(self.s.running_ids())
        for seq_id in self.s.running_ids():
            length = bm.seq_len(seq_id)
            assert len(bm.block_ids(seq_id)) * BLOCK >= length
            if self.s.state(seq_id) is SequenceState.DECODING:
                assert length == len(self.history[seq_id]) - 1
            else:
                assert length <= len(self.history[seq_id])

    def teardown(self) -> None:
        if not hasattr(self, "s") or getattr(self, "broken", False):
            return
        for _ in range(3000):
            if not self.s.has_work:
                break
            self._step()
        assert not self.s.has_work, "accepted work did not drain"
        for seq_id in self.history:
            if seq_id not in self.aborted:
                assert len(self.done[seq_id]) == self.max_new[seq_id]
        assert self.s.block_manager.num_used_blocks == 0
        pool = self.s.block_manager.window_pool
        assert pool is None or pool.num_used_blocks == 0


EngineMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEngineInvariants = EngineMachine.TestCase
