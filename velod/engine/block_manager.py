"""Paged KV-cache block manager: blocks, reference counts, copy-on-write and prefix caching.

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots; token ``p`` of a
sequence lives in slot ``table[p // block_size] * block_size + p % block_size``.

Each registered sequence owns a *row*: one line of a persistent ``int32`` block table
``[max_seqs, max_blocks_per_seq]`` (unused entries hold :data:`PAD_BLOCK`) plus its length
(slots written). Per-sequence methods take the caller's sequence id; the bulk methods take
row arrays so a scheduler can serve hundreds of sequences per step with a few NumPy calls.

Blocks are in exactly one of three states: *free* (LIFO stack, the most recently freed
block is reused first), *cached* (reference count 0 but holding registered prefix content,
evicted least recently used first when the free stack is empty), or *used* (reference
count = number of rows holding it). ``num_free_blocks`` counts free and cached blocks,
since both can be allocated.

Prefix caching: a full block is identified by a hash chain,
``hash((parent_hash, *token_ids))``. A hit is only taken when the stored key (parent hash
and token ids) is equal *and* the block's recorded parent is the very block (same content
generation) the new sequence already holds, so a hash collision can never hand out a block
with other content.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from velod.engine.errors import (
    DuplicateSequence,
    EngineConfigError,
    OutOfBlocks,
    OutOfSequenceSlots,
    SequenceTooLong,
    SlotsNotReserved,
    UnknownSequence,
)

PAD_BLOCK = 0
"""Block id written in unused block-table entries (never read: context_lens bound them)."""

ROOT_HASH = 0x7E10D
"""Parent hash of a sequence's first block."""

_NO_PARENT = -1


class BlockManager:
    """Allocates KV-cache blocks to sequences and keeps their block tables."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        max_seqs: int,
        max_seq_len: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        _check_positive("num_blocks", num_blocks)
        _check_positive("max_seqs", max_seqs)
        _check_positive("max_seq_len", max_seq_len)
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise EngineConfigError("block_size", block_size, "must be a power of two")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.max_seq_len = max_seq_len
        self.enable_prefix_caching = enable_prefix_caching
        self._shift = block_size.bit_length() - 1
        self._mask = block_size - 1

        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() returns block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, LRU first
        self._cache: dict[int, int] = {}  # chain hash -> block
        self._key: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash = [0] * num_blocks
        self._parent = [_NO_PARENT] * num_blocks
        self._parent_gen = [0] * num_blocks
        self._gen = [0] * num_blocks  # bumped each time a block gets new content

        self._rows: dict[int, int] = {}
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._blocks: list[list[int]] = [[] for _ in range(max_seqs)]
        self._tables = np.full((max_seqs, self.max_blocks_per_seq), PAD_BLOCK, dtype=np.int32)
        self._lens = np.zeros(max_seqs, dtype=np.int32)  # slots written (context length)
        self._caps = np.zeros(max_seqs, dtype=np.int32)  # slots reserved (blocks * size)
        self._hashed = [0] * max_seqs  # leading full blocks already registered
        self._cow: set[int] = set()  # rows that may share a partly filled last block

        self.hit_tokens = 0
        self.query_tokens = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Evictable blocks that still hold reusable prefix content."""
        return len(self._evictable)

    @property
    def utilization(self) -> float:
        """Fraction of blocks referenced by sequences."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_seqs(self) -> int:
        return len(self._rows)

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` more tokens fit in newly allocated blocks."""
        return (num_tokens + self._mask) >> self._shift <= self.num_free_blocks

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether ``seq_id`` can grow by ``num_tokens`` (copy-on-write included)."""
        return self._needed(self.row(seq_id), num_tokens) <= self.num_free_blocks

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks ``ensure(seq_id, num_tokens)`` would allocate."""
        return self._needed(self.row(seq_id), num_tokens)

    def row(self, seq_id: int) -> int:
        """The block-table row of a registered sequence."""
        try:
            return self._rows[seq_id]
        except KeyError:
            raise UnknownSequence(seq_id) from None

    def seq_ids(self) -> list[int]:
        return list(self._rows)

    def seq_len(self, seq_id: int) -> int:
        """Tokens of ``seq_id`` whose KV slots are written (its context length)."""
        return int(self._lens[self.row(seq_id)])

    def block_ids(self, seq_id: int) -> list[int]:
        return list(self._blocks[self.row(seq_id)])

    def block_table(self, seq_id: int) -> np.ndarray:
        """The sequence's block ids as an int32 array."""
        row = self.row(seq_id)
        return self._tables[row, : len(self._blocks[row])].copy()

    def slot_mapping(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """Slots (block * block_size + offset) of token positions ``start..end-1``."""
        row = self.row(seq_id)
        if not 0 <= start <= end <= self._caps[row]:
            raise SlotsNotReserved([seq_id])
        pos = np.arange(start, end, dtype=np.int32)
        return self._tables[row, pos >> self._shift] * self.block_size + (pos & self._mask)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def free_block_ids(self) -> list[int]:
        """Blocks on the free stack, next to be reused last."""
        return list(self._free)

    def cached_block_ids(self) -> list[int]:
        """Evictable cached blocks, least recently used first."""
        return list(self._evictable)

    # ------------------------------------------------------------------ sequences

    def add(self, seq_id: int, token_ids: Sequence[int] | None = None) -> int:
        """Register a sequence; returns its row.

        With ``token_ids`` and prefix caching on, the longest cached prefix of full blocks
        is reused (``seq_len`` tells how many tokens that covers). At least the last token
        is always left to compute, since its output is what the caller samples from.
        """
        if seq_id in self._rows:
            raise DuplicateSequence(seq_id)
        if not self._free_rows:
            raise OutOfSequenceSlots(self.max_seqs)
        row = self._free_rows.pop()
        self._rows[seq_id] = row
        blocks = self._blocks[row]
        if token_ids and self.enable_prefix_caching:
            self._match_prefix(token_ids, blocks)
            if blocks:
                self._tables[row, : len(blocks)] = blocks
        num_cached = len(blocks) << self._shift
        self._lens[row] = self._caps[row] = num_cached
        self._hashed[row] = len(blocks)
        return row

    def _match_prefix(self, token_ids: Sequence[int], blocks: list[int]) -> None:
        size = self.block_size
        limit = (len(token_ids) - 1) >> self._shift
        self.query_tokens += len(token_ids)
        cache, keys, ref, gen = self._cache, self._key, self._ref, self._gen
        parent, parent_hash = _NO_PARENT, ROOT_HASH
        for start in range(0, limit * size, size):
            key = (parent_hash, *token_ids[start : start + size])
            block_hash = hash(key)
            block = cache.get(block_hash)
            if (
                block is None
                or keys[block] != key
                or self._parent[block] != parent
                or (parent != _NO_PARENT and self._parent_gen[block] != gen[parent])
            ):
                break
            if ref[block] == 0:
                del self._evictable[block]
            ref[block] += 1
            blocks.append(block)
            parent, parent_hash = block, block_hash
        self.hit_tokens += len(blocks) * size

    def free(self, seq_id: int) -> None:
        """Drop a sequence; its blocks go back to the pool (cached content stays reusable)."""
        row = self.row(seq_id)
        del self._rows[seq_id]
        blocks = self._blocks[row]
        # Tail first: the deepest blocks are the least shareable, so they are evicted first.
        for block in reversed(blocks):
            self._release(block)
        if blocks:
            self._tables[row, : len(blocks)] = PAD_BLOCK
            blocks.clear()
        self._lens[row] = self._caps[row] = 0
        self._hashed[row] = 0
        self._cow.discard(row)
        self._free_rows.append(row)

    def fork(self, parent_id: int, child_id: int) -> int:
        """Register ``child_id`` sharing every block of ``parent_id``; returns the child's row.

        A shared, partly filled last block is copied (copy-on-write) by whichever of the
        two appends to it first: ``ensure`` returns that (source, destination) copy.
        """
        parent_row = self.row(parent_id)
        if child_id in self._rows:
            raise DuplicateSequence(child_id)
        row = self.add(child_id)
        blocks = self._blocks[parent_row]
        for block in blocks:
            self._ref[block] += 1
        self._blocks[row] = list(blocks)
        self._tables[row, : len(blocks)] = self._tables[parent_row, : len(blocks)]
        length = self._lens[parent_row]
        self._lens[row], self._caps[row] = length, self._caps[parent_row]
        self._hashed[row] = self._hashed[parent_row]
        if length & self._mask:
            self._cow.update((row, parent_row))
        return row

    def ensure(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Reserve slots for ``num_tokens`` more tokens; returns block copies to perform.

        Raises :class:`OutOfBlocks` (changing nothing) when the pool is too small.
        """
        return self.ensure_row(self.row(seq_id), num_tokens)

    def ensure_row(self, row: int, num_tokens: int) -> list[tuple[int, int]]:
        """:meth:`ensure` by row (the scheduler's hot path)."""
        length = int(self._lens[row])
        total = length + num_tokens
        if total > self.max_seq_len:
            raise SequenceTooLong(self._seq_of(row), total, self.max_seq_len)
        blocks = self._blocks[row]
        cow = num_tokens > 0 and row in self._cow
        copy = cow and length & self._mask and self._ref[blocks[-1]] > 1
        new = ((total + self._mask) >> self._shift) - len(blocks)
        needed = max(new, 0) + (1 if copy else 0)
        if needed > len(self._free) + len(self._evictable):
            raise OutOfBlocks(needed, self.num_free_blocks, self.num_blocks)
        copies = []
        if cow:
            self._cow.discard(row)
            if copy:
                source = blocks[-1]
                target = self._allocate()
                self._ref[source] -= 1
                blocks[-1] = target
                self._tables[row, len(blocks) - 1] = target
                copies.append((source, target))
        if new > 0:
            table = self._tables[row]
            for _ in range(new):
                block = self._allocate()
                table[len(blocks)] = block
                blocks.append(block)
            self._caps[row] = len(blocks) << self._shift
        return copies

    def _needed(self, row: int, num_tokens: int) -> int:
        length = int(self._lens[row])
        blocks = self._blocks[row]
        new = max(((length + num_tokens + self._mask) >> self._shift) - len(blocks), 0)
        if (
            num_tokens > 0
            and row in self._cow
            and length & self._mask
            and self._ref[blocks[-1]] > 1
        ):
            new += 1
        return new

    def append(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Mark ``num_tokens`` more tokens of one sequence written; returns their slots."""
        row = self.row(seq_id)
        _, slots = self.append_rows(np.array([row]), np.array([num_tokens]))
        return slots

    def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Register the sequence's newly filled blocks for prefix reuse.

        ``token_ids`` must hold (at least) every token written so far. Call it once the
        KV of those tokens is really in the cache (after the step that writes them).
        """
        self.cache_full_blocks_row(self.row(seq_id), token_ids)

    def cache_full_blocks_row(self, row: int, token_ids: Sequence[int]) -> None:
        """:meth:`cache_full_blocks` by row."""
        full = int(self._lens[row]) >> self._shift
        first = self._hashed[row]
        if first >= full or not self.enable_prefix_caching:
            return
        size = self.block_size
        blocks = self._blocks[row]
        keys, hashes, cache = self._key, self._hash, self._cache
        if first:
            parent = blocks[first - 1]
            parent_hash = hashes[parent]
        else:
            parent, parent_hash = _NO_PARENT, ROOT_HASH
        for index in range(first, full):
            block = blocks[index]
            if keys[block] is None:
                start = index * size
                key = (parent_hash, *token_ids[start : start + size])
                block_hash = hash(key)
                keys[block] = key
                hashes[block] = block_hash
                self._parent[block] = parent
                self._parent_gen[block] = self._gen[parent] if parent != _NO_PARENT else 0
                cache[block_hash] = block
            parent, parent_hash = block, hashes[block]
        self._hashed[row] = full

    # ------------------------------------------------------------------ bulk (rows)

    def seq_lens(self, rows: np.ndarray) -> np.ndarray:
        return self._lens[rows]

    def rows_needing_blocks(self, rows: np.ndarray) -> list[int]:
        """Rows whose next single-token append needs a new block or a copy-on-write."""
        needing = rows[(self._lens[rows] & self._mask) == 0].tolist()
        if self._cow:
            cow = np.fromiter(self._cow, dtype=rows.dtype, count=len(self._cow))
            needing = rows[((self._lens[rows] & self._mask) == 0) | np.isin(rows, cow)].tolist()
        return needing

    def append_rows(
        self, rows: np.ndarray, counts: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mark tokens written for distinct ``rows``; returns (positions, slots), int32.

        ``counts`` tokens per row (None = one each, the decode case), in row order. Slots
        must have been reserved with :meth:`ensure_row`.
        """
        start = self._lens[rows]
        if counts is None:
            positions = start
            end = start + 1
            token_rows = rows
        else:
            end = start + counts
            token_index = np.repeat(np.arange(len(rows)), counts)
            token_rows = rows[token_index]
            shift = np.cumsum(counts) - counts - start  # position = token number - shift
            positions = np.arange(len(token_index), dtype=np.int32) - shift[token_index]
            positions = positions.astype(np.int32, copy=False)
        if (end > self._caps[rows]).any():
            late = rows[end > self._caps[rows]].tolist()
            raise SlotsNotReserved([self._seq_of(r) for r in late])
        slots = self._tables[token_rows, positions >> self._shift]
        slots <<= self._shift
        slots += positions & self._mask
        self._lens[rows] = end
        return positions, slots

    def block_tables(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Block tables of ``rows`` as an int32 ``[len(rows), width]`` array (padded)."""
        return self._tables[rows, :width]

    # ------------------------------------------------------------------ blocks

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            if self._cache.get(self._hash[block]) == block:
                del self._cache[self._hash[block]]
        self._key[block] = None
        self._ref[block] = 1
        self._gen[block] += 1
        return block

    def _release(self, block: int) -> None:
        count = self._ref[block] - 1
        self._ref[block] = count
        if count:
            return
        if self._key[block] is not None and self._cache.get(self._hash[block]) == block:
            self._evictable[block] = None
        else:
            self._free.append(block)

    def _seq_of(self, row: int) -> int:
        for seq_id, r in self._rows.items():
            if r == row:
                return seq_id
        return -1


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EngineConfigError(name, value, "must be a positive integer")
