"""Block manager: allocation order, reference counts, copy-on-write, prefix caching, errors."""

from __future__ import annotations

import numpy as np
import pytest

from velod.engine import (
    PAD_BLOCK,
    BlockManager,
    DuplicateSequence,
    EngineConfigError,
    OutOfBlocks,
    OutOfSequenceSlots,
    SequenceTooLong,
    SlotsNotReserved,
    UnknownSequence,
)


def manager(num_blocks: int = 8, block_size: int = 4, **kw: object) -> BlockManager:
    options = {"max_seqs": 4, "max_seq_len": 64, "enable_prefix_caching": True} | kw
    return BlockManager(num_blocks, block_size, **options)  # type: ignore[arg-type]


def write(bm: BlockManager, seq_id: int, tokens: list[int]) -> np.ndarray:
    """Reserve, write and register ``tokens`` after what the sequence holds."""
    bm.ensure(seq_id, len(tokens))
    return bm.append(seq_id, len(tokens))


def cached_prompt(bm: BlockManager, seq_id: int, prompt: list[int]) -> None:
    """Add a sequence of ``prompt``, write it and register its full blocks for reuse."""
    bm.add(seq_id, prompt)
    write(bm, seq_id, prompt)
    bm.cache_full_blocks(seq_id, prompt)


def test_freed_blocks_are_reused_most_recent_first() -> None:
    bm = manager(enable_prefix_caching=False)
    bm.add(1)
    bm.ensure(1, 8)
    first, second = bm.block_ids(1)
    bm.add(2)
    bm.ensure(2, 4)
    bm.free(1)  # frees tail first: second, then first -> first is on top
    bm.add(3)
    bm.ensure(3, 8)
    assert bm.block_ids(3) == [first, second]


def test_counts_and_utilization_follow_allocation() -> None:
    bm = manager()
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.utilization) == (8, 0, 0.0)
    bm.add(1)
    bm.ensure(1, 9)
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    assert bm.utilization == pytest.approx(3 / 8)
    assert bm.can_fit(20) and not bm.can_fit(21)
    # nothing written yet: 3 reserved blocks + 5 free ones hold 32 tokens
    assert bm.can_append(1, 32) and not bm.can_append(1, 33)


def test_block_table_and_slot_mapping_use_block_times_size_plus_offset() -> None:
    bm = manager(enable_prefix_caching=False)
    bm.add(7)
    bm.add(1)
    bm.ensure(1, 6)
    slots = bm.append(1, 6)
    table = bm.block_table(1)
    assert table.dtype == np.int32 and len(table) == 2
    expected = [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert slots.tolist() == expected
    assert bm.slot_mapping(1, 2, 6).tolist() == expected[2:]
    assert bm.seq_len(1) == 6


def test_append_rows_handles_several_rows_and_counts() -> None:
    bm = manager(num_blocks=16, enable_prefix_caching=False)
    rows = np.array([bm.add(10), bm.add(11)])
    write(bm, 10, [0] * 3)
    bm.ensure(10, 6)
    bm.ensure(11, 5)
    positions, slots = bm.append_rows(rows, np.array([6, 5]))
    assert positions.tolist() == [3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4]
    assert slots[:6].tolist() == bm.slot_mapping(10, 3, 9).tolist()
    assert slots[6:].tolist() == bm.slot_mapping(11, 0, 5).tolist()
    tables = bm.block_tables(rows, 3)
    assert tables.shape == (2, 3) and tables[1, 2] == PAD_BLOCK


def test_fork_shares_blocks_and_freeing_one_keeps_the_other() -> None:
    bm = manager()
    bm.add(1)
    write(bm, 1, [1] * 8)
    bm.fork(1, 2)
    assert bm.block_ids(2) == bm.block_ids(1)
    assert all(bm.ref_count(b) == 2 for b in bm.block_ids(1))
    bm.free(1)
    assert all(bm.ref_count(b) == 1 for b in bm.block_ids(2))


def test_append_into_shared_partial_block_copies_it_once() -> None:
    bm = manager()
    bm.add(1)
    write(bm, 1, [1, 2, 3, 4, 5, 6])
    shared = bm.block_ids(1)[1]
    bm.fork(1, 2)
    copies = bm.ensure(2, 1)
    assert len(copies) == 1 and copies[0][0] == shared
    new = copies[0][1]
    assert bm.block_ids(2)[1] == new and bm.block_ids(1)[1] == shared
    assert bm.ref_count(shared) == 1 and bm.ref_count(new) == 1
    assert bm.ensure(1, 1) == []  # the parent now owns its block alone


def test_fork_at_block_boundary_needs_no_copy() -> None:
    bm = manager()
    bm.add(1)
    write(bm, 1, [1] * 8)
    bm.fork(1, 2)
    assert bm.ensure(2, 1) == [] and bm.ensure(1, 1) == []
    assert bm.block_ids(1)[2] != bm.block_ids(2)[2]


def test_prefix_hit_reuses_full_blocks_with_matching_tokens() -> None:
    bm = manager(num_blocks=16)
    prompt = list(range(10))
    cached_prompt(bm, 1, prompt)
    blocks = bm.block_ids(1)
    bm.add(2, [*prompt[:9], 99])
    assert bm.seq_len(2) == 8 and bm.block_ids(2) == blocks[:2]
    bm.add(3, [0, 1, 2, 3, 4, 4, 6, 7, 8, 9])  # second block differs
    assert bm.seq_len(3) == 4 and bm.block_ids(3) == blocks[:1]


def test_prefix_hit_always_leaves_the_last_token_to_compute() -> None:
    bm = manager(num_blocks=16)
    prompt = list(range(8))
    cached_prompt(bm, 1, prompt)
    bm.add(2, prompt)
    assert bm.seq_len(2) == 4  # not 8: the final token must produce logits


def test_freed_cached_blocks_stay_reusable_until_needed() -> None:
    bm = manager(num_blocks=4)
    prompt = list(range(9))
    cached_prompt(bm, 1, prompt)
    cached = bm.block_ids(1)[:2]
    bm.free(1)
    assert sorted(bm.cached_block_ids()) == sorted(cached)
    assert bm.num_free_blocks == 4
    bm.add(2, prompt)
    assert bm.block_ids(2) == cached


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    bm = manager(num_blocks=4)
    for seq_id, base in ((1, 100), (2, 200)):
        prompt = [base + i for i in range(5)]
        cached_prompt(bm, seq_id, prompt)
    old, recent = bm.block_ids(1)[0], bm.block_ids(2)[0]
    bm.free(1)
    bm.free(2)  # free stack now holds the two partial blocks, cache holds old, recent
    bm.add(3)
    bm.ensure(3, 12)  # two from the free stack, then evicts one cached block
    assert old in bm.block_ids(3) and recent not in bm.block_ids(3)
    assert bm.cached_block_ids() == [recent]
    bm.add(4, [100, 101, 102, 103, 104])
    assert bm.seq_len(4) == 0  # its content is gone


def test_hash_collision_never_hands_out_a_block_with_other_tokens() -> None:
    bm = manager(num_blocks=16)
    prompt = [1, 2, 3, 4, 5]
    cached_prompt(bm, 1, prompt)
    block = bm.block_ids(1)[0]
    other = [9, 9, 9, 9, 9]
    forged = hash((0x7E10D, np.array(other[:4], dtype=np.int32).tobytes()))
    bm._cache[forged] = block  # simulate a colliding hash
    bm.add(2, other)
    assert bm.seq_len(2) == 0


def test_errors_are_typed_and_leave_state_unchanged() -> None:
    bm = manager(num_blocks=2, max_seqs=2, max_seq_len=16)
    bm.add(1)
    with pytest.raises(OutOfBlocks, match="need 3, 2 free of 2"):
        bm.ensure(1, 12)
    assert bm.num_free_blocks == 2 and bm.block_ids(1) == []
    with pytest.raises(SlotsNotReserved):
        bm.append(1, 1)
    with pytest.raises(SequenceTooLong):
        bm.ensure(1, 17)
    with pytest.raises(UnknownSequence, match="unknown sequence 5"):
        bm.free(5)
    with pytest.raises(DuplicateSequence):
        bm.add(1)
    bm.add(2)
    with pytest.raises(OutOfSequenceSlots):
        bm.add(3)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("block_size", {"block_size": 12}),
        ("num_blocks", {"num_blocks": 0}),
        ("max_seqs", {"max_seqs": -1}),
    ],
)
def test_bad_geometry_is_rejected(field: str, kwargs: dict) -> None:
    options = {"num_blocks": 8, "block_size": 4, "max_seqs": 2, "max_seq_len": 8} | kwargs
    with pytest.raises(EngineConfigError, match=field):
        BlockManager(**options)
