"""The second block pool of sliding-window layers: blocks released once out of every future
window, admission and growth counted in both pools, prefix hits only where the window is
cached, copy-on-write in both pools. (The stateful test in test_engine_invariants.py checks
the same invariants over random workloads.)"""

from __future__ import annotations

import numpy as np
import pytest

from velod.engine import BlockManager, EngineConfigError, OutOfBlocks, Scheduler, SchedulerConfig
from velod.engine.core.window_pool import PAD_BLOCK
from velod.engine.runtime.pool import block_bytes, plan_pool, window_blocks_wanted
from velod.engine.settings import EngineSettings
from velod.model.kv import kv_cache_size
from velod.model.metadata import Geometry

BLOCK = 4


def manager(num_blocks: int = 32, window: int = 6, window_blocks: int = 8,
            **kw: object) -> BlockManager:
    options = {"max_seqs": 4, "max_seq_len": 64, "enable_prefix_caching": True} | kw
    return BlockManager(num_blocks, BLOCK, window=window, window_blocks=window_blocks,
                        **options)  # type: ignore[arg-type]


def grow(bm: BlockManager, seq_id: int, count: int) -> None:
    """Append ``count`` tokens to ``seq_id`` as a step would: release, reserve, write."""
    row = bm.row(seq_id)
    bm.slide_windows(np.array([row]))
    bm.ensure_row(row, count)
    bm.append_rows(np.array([row]), np.array([count]))


def test_a_sequence_holds_only_the_blocks_its_window_can_still_see() -> None:
    bm = manager(window=6)
    bm.add(1)
    for length in range(1, 41):
        grow(bm, 1, 1)
        bm.slide_windows(np.array([bm.row(1)]))
        first, held = bm.window_block_table(1)
        # The next query (position `length`) sees length - 5 onwards.
        assert first == max(length - 6 + 1, 0) // BLOCK
        assert len(held) <= 3  # the 5 tokens before the next query span at most 2 blocks
    assert len(bm.block_ids(1)) == 10  # the full-attention layers keep everything
    pool = bm.window_pool
    assert pool is not None and pool.num_used_blocks == len(held)
    row = bm.row(1)
    assert (pool.tables[row, :first] == PAD_BLOCK).all()  # released: never read


def test_released_window_blocks_serve_other_sequences() -> None:
    bm = manager(window=4, window_blocks=6, enable_prefix_caching=False)
    bm.add(1)
    grow(bm, 1, 4)
    for _ in range(20):
        grow(bm, 1, 1)  # 24 tokens: 6 blocks in all, but it never holds more than 3
    bm.add(2)
    grow(bm, 2, 4)  # the pool of 6 has room for the second sequence's window
    assert bm.num_free_window_blocks == 6 - len(bm.window_block_table(1)[1]) - 1


def test_fits_and_growth_count_the_window_pool_too() -> None:
    bm = manager(num_blocks=64, window=8, window_blocks=4)
    row = bm.add(1)
    assert bm.fits_row(row, 8)
    assert bm.window_blocks_needed_row(row, 12) == 3
    assert bm.blocks_needed_row(row, 12) == 3
    grow(bm, 1, 12)
    other = bm.add(2)
    assert bm.num_free_blocks > 40 and bm.num_free_window_blocks == 1
    assert not bm.fits_row(other, 8)  # plenty of full blocks, one window block
    with pytest.raises(OutOfBlocks):
        bm.ensure_row(other, 8)
    assert bm.num_free_window_blocks == 1 and bm.block_ids(2) == []  # nothing changed
    assert bm.can_grow(1) and not bm.can_grow(2)


def test_a_window_pool_smaller_than_one_window_is_refused() -> None:
    with pytest.raises(EngineConfigError, match="window_blocks=3: holds no sequence's 12-token "
                       "window: at least 5 blocks"):
        manager(window=12, window_blocks=3)


def test_a_prefix_hit_needs_its_window_cached_and_is_shortened_otherwise() -> None:
    bm = manager(num_blocks=64, window=6, window_blocks=8)
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks can be hit
    bm.add(1)
    grow(bm, 1, 17)
    bm.cache_full_blocks(1, prompt)
    bm.free(1)
    bm.add(2, prompt)
    assert bm.seq_len(2) == 16  # every full block, and the window behind position 16
    first, held = bm.window_block_table(2)
    assert first == (16 - 6 + 1) // BLOCK and len(held) == 4 - first
    bm.free(2)
    bm.add(3)
    grow(bm, 3, 32)  # takes all 8 window blocks: the cached window is evicted
    pool = bm.window_pool
    assert pool is not None and pool.num_cached_blocks == 0
    bm.free(3)
    bm.add(4, prompt)
    assert bm.seq_len(4) == 0  # the full blocks are still cached, their window is not
    assert bm.window_block_table(4)[0] == 0
    assert bm.num_used_blocks == 0  # the shortened hit gave its full blocks back


def test_a_prefix_hit_stops_before_a_missing_window_block() -> None:
    bm = manager(num_blocks=64, window=5, window_blocks=12)
    prompt = list(range(1, 26))  # 25 tokens: 6 full blocks can be hit
    bm.add(1)
    grow(bm, 1, 25)
    bm.cache_full_blocks(1, prompt)
    full = bm.block_ids(1)
    pool = bm.window_pool
    assert pool is not None
    bm.free(1)
    # Forget the windowed twin of block 5 (index 5): hits of 6 blocks need it; 5 do not.
    pool.forget(full[5], bm._gen[full[5]])
    bm.add(2, prompt)
    assert bm.seq_len(2) == 5 * BLOCK
    assert bm.ref_count(full[5]) == 0  # given back to the cache, not leaked


def test_evicting_a_full_block_drops_its_windowed_twin() -> None:
    bm = manager(num_blocks=4, window=4, window_blocks=4)
    prompt = list(range(1, 10))
    bm.add(1)
    grow(bm, 1, 9)
    bm.cache_full_blocks(1, prompt)
    bm.free(1)
    pool = bm.window_pool
    assert pool is not None and pool.num_cached_blocks == 2
    bm.add(2)
    grow(bm, 2, 16)  # evicts every cached full block
    assert pool.num_cached_blocks == 0


def test_fork_shares_window_blocks_and_copies_the_partial_one_on_write() -> None:
    bm = manager(window=6)
    bm.add(1)
    grow(bm, 1, 10)  # 2.5 blocks
    bm.fork(1, 2)
    pool = bm.window_pool
    assert pool is not None
    _, parent = bm.window_block_table(1)
    _, child = bm.window_block_table(2)
    assert parent.tolist() == child.tolist()
    assert all(pool.ref_count(b) == 2 for b in parent.tolist())
    copies = bm.ensure(2, 1)
    window_copies = bm.take_window_copies()
    assert len(copies) == 1 and len(window_copies) == 1
    source, target = window_copies[0]
    assert source == parent[-1] and bm.window_block_table(2)[1][-1] == target
    assert bm.take_window_copies() == []


def test_the_scheduler_chunks_a_long_prompt_to_what_the_window_pool_holds() -> None:
    config = SchedulerConfig(num_blocks=64, block_size=BLOCK, max_batch_size=2,
                             max_tokens_per_step=64, max_model_len=128, window=6,
                             window_blocks=5)
    scheduler = Scheduler(config)
    scheduler.submit(list(range(1, 41)), 2)
    chunks = []
    while scheduler.has_work:
        batch = scheduler.step()
        chunks.append(int(batch.query_lens.sum()))
        assert batch.window_block_tables is not None
        scheduler.complete_step(batch, [7] * len(batch.sample_seq_ids))
    # (5 - 2) * 4 - 6 + 2 = 8 tokens at most per chunk, though the step budget is 64
    assert chunks[:5] == [8, 8, 8, 8, 8] and chunks[5:] == [1]


def test_admission_waits_for_the_window_pool() -> None:
    config = SchedulerConfig(num_blocks=256, block_size=BLOCK, max_batch_size=4,
                             max_tokens_per_step=64, max_model_len=128, window=8,
                             window_blocks=8, enable_prefix_caching=False)
    scheduler = Scheduler(config)
    first = scheduler.submit(list(range(1, 21)), 4)  # 20 tokens: 5 window blocks
    second = scheduler.submit(list(range(1, 21)), 4)
    batch = scheduler.step()
    # The first prompt's chunk of 18 tokens (the most one window pool of 8 blocks allows)
    # takes 5 window blocks: the second one's does not fit beside it.
    assert batch.seq_ids.tolist() == [first] and batch.query_lens.tolist() == [18]
    scheduler.complete_step(batch, [])
    batch = scheduler.step()  # the first released its out-of-window blocks: room now
    assert second in batch.seq_ids.tolist()


# ------------------------------------------------------------------ sizing the two pools

GEMMA3_270M = Geometry(architecture="gemma3", layers=18, heads=4, kv_heads=1, key_length=256,
                       value_length=256, embedding_length=640, context_length=32768,
                       vocab_size=262144, sliding_window=512,
                       windowed=tuple(i % 6 < 5 for i in range(18)))


def gemma_settings(budget: int, **changes: object) -> EngineSettings:
    values = {"geometry": GEMMA3_270M, "model": "gemma3.gguf", "dtype": "float16",
              "kv_cache_bytes": budget, "block_size": 16, "max_batch_size": 4,
              "max_tokens_per_step": 512, "language_model": True} | changes
    return EngineSettings(**values)  # type: ignore[arg-type]


def test_gemma3s_cache_is_sized_as_llama_cpp_sizes_it_not_six_times_larger():
    # What llama-server allocates for -c 32768 -np 4 (four slots of 8192 tokens), f16.
    llama = kv_cache_size(GEMMA3_270M, 8192, 4, "float16")
    plan = plan_pool(gemma_settings(llama.total), 1 << 40, "host")
    # The same bytes hold four full contexts in the full-attention pool, and every slot's
    # window plus a step's chunk in the window pool.
    assert plan.num_blocks * 16 >= 4 * 8192
    assert plan.window_blocks == window_blocks_wanted(gemma_settings(llama.total))
    assert plan.bytes <= llama.total
    # One pool over every layer would not hold even the four contexts (8,864 tokens of the
    # 32,768): every layer's cache would be sized as the 3 full-attention ones are.
    one_pool = llama.total // block_bytes(gemma_settings(llama.total)) * 16
    assert one_pool < 4 * 8192 / 3 and plan.num_blocks * 16 > 4 * one_pool


def test_a_budget_below_a_full_batch_of_windows_gets_as_many_blocks_in_each_pool():
    small = 64 * block_bytes(gemma_settings(0))  # 64 blocks of all 18 layers
    plan = plan_pool(gemma_settings(small, max_batch_size=64), 1 << 40, "host")
    assert plan.num_blocks == plan.window_blocks == 64
    assert plan.bytes <= small
