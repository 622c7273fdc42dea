"""The block manager's row API, the one the scheduler drives each step (bulk, by row)."""

from __future__ import annotations

import numpy as np
import pytest

from velod.engine import BlockManager, OutOfBlocks, SequenceTooLong, SlotsNotReserved


def manager(num_blocks: int = 8, block_size: int = 4, **kw: object) -> BlockManager:
    options = {"max_seqs": 4, "max_seq_len": 64, "enable_prefix_caching": True} | kw
    return BlockManager(num_blocks, block_size, **options)  # type: ignore[arg-type]


def test_ensure_row_reserves_whole_blocks_and_blocks_needed_row_predicts_it() -> None:
    bm = manager()
    row = bm.add(1)
    assert bm.blocks_needed_row(row, 5) == 2
    assert bm.ensure_row(row, 5) == []  # nothing shared: no copies
    assert len(bm.block_ids(1)) == 2 and bm.num_used_blocks == 2
    assert bm.blocks_needed_row(row, 8) == 0  # 8 slots reserved, none written yet
    assert bm.blocks_needed_row(row, 9) == 1


def test_ensure_row_changes_nothing_when_blocks_run_out() -> None:
    bm = manager(num_blocks=2)
    row = bm.add(1)
    with pytest.raises(OutOfBlocks):
        bm.ensure_row(row, 9)
    assert bm.num_free_blocks == 2 and bm.block_ids(1) == []


def test_ensure_row_refuses_a_sequence_longer_than_the_limit() -> None:
    bm = manager(max_seq_len=8)
    row = bm.add(1)
    with pytest.raises(SequenceTooLong):
        bm.ensure_row(row, 9)


def test_append_rows_without_counts_is_one_decode_token_per_row() -> None:
    bm = manager(num_blocks=16, enable_prefix_caching=False)
    rows = np.array([bm.add(1), bm.add(2)])
    for row, length in zip(rows.tolist(), (3, 6), strict=True):
        bm.ensure_row(row, length + 1)
        bm.append_rows(np.array([row]), np.array([length]))
    positions, slots = bm.append_rows(rows)
    assert positions.tolist() == [3, 6]
    assert slots.tolist() == [bm.slot_mapping(1, 3, 4)[0], bm.slot_mapping(2, 6, 7)[0]]
    assert bm.seq_lens(rows).tolist() == [4, 7]


def test_append_rows_refuses_slots_that_were_not_reserved() -> None:
    bm = manager()
    rows = np.array([bm.add(1)])
    bm.ensure_row(int(rows[0]), 4)
    bm.append_rows(rows, np.array([4]))
    with pytest.raises(SlotsNotReserved):
        bm.append_rows(rows)  # the one block is full
    assert bm.seq_lens(rows).tolist() == [4]


def test_grow_rows_gives_each_full_row_one_more_block() -> None:
    bm = manager(num_blocks=8)
    rows = np.array([bm.add(1), bm.add(2)])
    for row in rows.tolist():
        bm.ensure_row(row, 4)
    bm.append_rows(rows, np.array([4, 4]))
    free = bm.num_free_blocks
    bm.grow_rows(rows)
    assert bm.num_free_blocks == free - 2
    assert [len(bm.block_ids(s)) for s in (1, 2)] == [2, 2]
    positions, _ = bm.append_rows(rows)
    assert positions.tolist() == [4, 4]


def test_grow_rows_refuses_rows_with_room_left_and_a_pool_too_small() -> None:
    bm = manager(num_blocks=4)
    rows = np.array([bm.add(1), bm.add(2)])
    bm.ensure_row(int(rows[0]), 4)
    bm.ensure_row(int(rows[1]), 4)
    with pytest.raises(SlotsNotReserved):
        bm.grow_rows(rows)  # nothing written yet: the blocks still have room
    bm.append_rows(rows, np.array([4, 4]))
    bm.ensure_row(bm.add(3), 1)  # one block left
    with pytest.raises(OutOfBlocks):
        bm.grow_rows(rows)  # two rows, one free block
    assert [len(bm.block_ids(s)) for s in (1, 2)] == [1, 1]


def test_block_tables_are_padded_int32_rows() -> None:
    bm = manager()
    rows = np.array([bm.add(1), bm.add(2)])
    bm.ensure_row(int(rows[0]), 9)
    tables = bm.block_tables(rows, 3)
    assert tables.dtype == np.int32 and tables.shape == (2, 3)
    assert tables[0].tolist() == bm.block_ids(1)


def test_a_fork_leaves_its_shared_partial_block_pending_copy() -> None:
    bm = manager()
    row = bm.add(1)
    bm.ensure_row(row, 6)
    bm.append_rows(np.array([row]), np.array([6]))
    child = bm.fork(1, 2)
    assert set(bm.copy_pending_rows()) == {row, child}
    copies = bm.ensure_row(child, 1)
    assert len(copies) == 1 and copies[0][0] == bm.block_ids(1)[1]
    assert child not in bm.copy_pending_rows()


def test_cache_last_blocks_rows_registers_prefixes_like_the_general_path() -> None:
    tokens = np.arange(100, 116, dtype=np.int32).reshape(2, 8)
    bulk, general = manager(num_blocks=16), manager(num_blocks=16)
    for bm in (bulk, general):
        rows = np.array([bm.add(1), bm.add(2)])
        for row in rows.tolist():
            bm.ensure_row(row, 8)
        bm.append_rows(rows, np.array([3, 3]))  # block 0 of each, unregistered so far
        buffer = np.zeros((bm.max_seqs, 64), np.int32)
        buffer[rows, :8] = tokens
        bm.append_rows(rows)  # the 4th token fills block 0
        if bm is bulk:
            bm.cache_last_blocks_rows(rows, buffer)
        else:
            for row in rows.tolist():
                bm.cache_full_blocks_row(row, buffer[row])
    # Both register the same blocks: a new sequence with either prompt reuses its block 0.
    for bm in (bulk, general):
        for seq, source, prompt in ((3, 1, tokens[0]), (4, 2, tokens[1])):
            bm.add(seq, prompt[:5])
            assert bm.seq_len(seq) == 4
            assert bm.block_ids(seq) == bm.block_ids(source)[:1]
