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

Sliding-window layers: with ``window`` set, the blocks of the model's windowed layers come
from a second pool (:class:`~velod.engine.core.window_pool.WindowPool`) with a table of their
own per row, allocated at the same indices as the full-attention blocks and released once
they fall out of every future query's window (:meth:`BlockManager.slide_windows`). Whether
something fits (:meth:`BlockManager.fits_row`, :meth:`BlockManager.can_grow`) counts both
pools; copy-on-write copies in the window pool are collected for the step
(:meth:`BlockManager.take_window_copies`).

Prefix caching: a full block is identified by a hash chain, ``hash((parent_hash, ids))``
where ``ids`` are its token ids as int32 bytes. A hit is only taken when the block's token
ids are equal *and* its recorded parent is the very block (same content generation) the
new sequence already holds for the previous position: by induction the whole prefix then
matches, so a hash collision can never hand out a block with other content.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from velod.engine.core.block_pool import BlockPool
from velod.engine.core.errors import (
    DuplicateSequence,
    EngineConfigError,
    OutOfBlocks,
    OutOfSequenceSlots,
    SequenceTooLong,
    SlotsNotReserved,
    UnknownSequence,
)
from velod.engine.core.window_pool import WindowPool

PAD_BLOCK = 0
"""Block id written in unused block-table entries (never read: context_lens bound them)."""

ROOT_HASH = 0x7E10D
"""Parent hash of a sequence's first block."""

_NO_PARENT = -1


TokenIds = np.ndarray | Sequence[int]


class BlockManager(BlockPool):
    """Allocates KV-cache blocks to sequences and keeps their block tables."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        max_seqs: int,
        max_seq_len: int,
        enable_prefix_caching: bool = True,
        window: int | None = None,
        window_blocks: int = 0,
    ) -> None:
        _check_positive("num_blocks", num_blocks)
        _check_positive("max_seqs", max_seqs)
        _check_positive("max_seq_len", max_seq_len)
        if not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
            raise EngineConfigError("block_size", block_size, "must be a power of two")
        super().__init__(num_blocks, block_size)
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self._mask = block_size - 1
        self._stride = block_size * 4  # bytes of one block's int32 token ids

        self._cache: dict[int, int] = {}  # chain hash -> block
        self._key: list[bytes | None] = [None] * num_blocks  # token ids of registered blocks
        self._hash = [0] * num_blocks
        self._link = [_NO_PARENT] * num_blocks  # parent block << 32 | its generation
        self._gen = [0] * num_blocks  # bumped whenever a block's registered content is dropped

        self._rows: dict[int, int] = {}
        self._row_ids = [-1] * max_seqs
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._tables = np.full((max_seqs, self.max_blocks_per_seq), PAD_BLOCK, dtype=np.int32)
        self._lens = np.zeros(max_seqs, dtype=np.int32)  # slots written (context length)
        self._caps = np.zeros(max_seqs, dtype=np.int32)  # slots reserved (blocks * size)
        self._hashed = [0] * max_seqs  # leading full blocks already registered
        self._cow: set[int] = set()  # rows that may share a partly filled last block
        self.window_pool: WindowPool | None = None
        self._window_copies: list[tuple[int, int]] = []
        if window is not None:
            _check_positive("window", window)
            _check_positive("window_blocks", window_blocks)
            self.window_pool = WindowPool(window_blocks, block_size, window, max_seqs=max_seqs,
                                          max_blocks_per_seq=self.max_blocks_per_seq)
            if self.window_pool.max_chunk() < 1:
                raise EngineConfigError(
                    "window_blocks", window_blocks,
                    f"holds no sequence's {window}-token window: at least "
                    f"{self.window_pool.blocks_for_chunk(1)} blocks are needed")

    # ------------------------------------------------------------------ queries

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

    @property
    def num_free_window_blocks(self) -> int:
        """Free (and evictable) blocks of the window pool; 0 without one."""
        return self.window_pool.num_free_blocks if self.window_pool is not None else 0

    def fits_row(self, row: int, num_tokens: int) -> bool:
        """Whether ``ensure_row(row, num_tokens)`` can succeed now, in both pools."""
        if self.blocks_needed_row(row, num_tokens) > self.num_free_blocks:
            return False
        pool = self.window_pool
        return pool is None or self.window_blocks_needed_row(row, num_tokens) <= \
            pool.num_free_blocks

    def can_grow(self, count: int) -> bool:
        """Whether ``count`` rows can each get one more block (:meth:`grow_rows`)."""
        pool = self.window_pool
        return count <= self.num_free_blocks and (pool is None or count <= pool.num_free_blocks)

    def free_counts(self) -> tuple[int, int]:
        """Free blocks of the full pool and of the window pool (0 without one)."""
        return self.num_free_blocks, self.num_free_window_blocks

    @property
    def max_chunk(self) -> int | None:
        """The longest chunk one sequence can compute alone (the window pool's limit), or
        None when any chunk can."""
        return self.window_pool.max_chunk() if self.window_pool is not None else None

    def can_fit(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` more tokens fit in newly allocated blocks."""
        return (num_tokens + self._mask) >> self._shift <= self.num_free_blocks

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether ``seq_id`` can grow by ``num_tokens`` (copy-on-write included)."""
        return self.blocks_needed_row(self.row(seq_id), num_tokens) <= self.num_free_blocks

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks ``ensure(seq_id, num_tokens)`` would allocate."""
        return self.blocks_needed_row(self.row(seq_id), num_tokens)

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
        return self.block_table(seq_id).tolist()

    def block_table(self, seq_id: int) -> np.ndarray:
        """The sequence's block ids as an int32 array."""
        row = self.row(seq_id)
        return self._tables[row, : int(self._caps[row]) >> self._shift].copy()

    def slot_mapping(self, seq_id: int, start: int, end: int) -> np.ndarray:
        """Slots (block * block_size + offset) of token positions ``start..end-1``."""
        row = self.row(seq_id)
        if not 0 <= start <= end <= self._caps[row]:
            raise SlotsNotReserved([seq_id])
        pos = np.arange(start, end, dtype=np.int32)
        return self._tables[row, pos >> self._shift] * self.block_size + (pos & self._mask)

    # ------------------------------------------------------------------ sequences

    def add(self, seq_id: int, token_ids: TokenIds | None = None) -> int:
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
        self._row_ids[row] = seq_id
        hits = 0
        if token_ids is not None and self.enable_prefix_caching and len(token_ids) > 1:
            blocks = self._match_prefix(token_ids)
            if blocks and self.window_pool is not None:
                blocks = self._window_hits(row, blocks)
            hits = len(blocks)
            if hits:
                self._tables[row, :hits] = blocks
        self._lens[row] = self._caps[row] = hits << self._shift
        self._hashed[row] = hits
        return row

    def _match_prefix(self, token_ids: TokenIds) -> list[int]:
        limit = (len(token_ids) - 1) >> self._shift
        if not limit:
            return []
        data = _as_bytes(token_ids, 0, limit << self._shift)
        stride = self._stride
        cache, keys, ref, gen, links = self._cache, self._key, self._ref, self._gen, self._link
        blocks: list[int] = []
        link, parent_hash = _NO_PARENT, ROOT_HASH
        for offset in range(0, len(data), stride):
            key = data[offset : offset + stride]
            block_hash = hash((parent_hash, key))
            block = cache.get(block_hash)
            if block is None or links[block] != link or keys[block] != key:
                break
            if ref[block] == 0:
                del self._evictable[block]
            ref[block] += 1
            blocks.append(block)
            link, parent_hash = (block << 32) | gen[block], block_hash
        return blocks

    def _window_hits(self, row: int, blocks: list[int]) -> list[int]:
        """The part of a prefix hit whose window is cached too; the rest is given back."""
        pool = self.window_pool
        assert pool is not None
        gens = [self._gen[b] for b in blocks]
        usable = pool.usable_hits(blocks, gens)
        ref = self._ref
        for block in reversed(blocks[usable:]):
            ref[block] -= 1
            if not ref[block]:
                self._evictable[block] = None  # registered: back among the cached ones
        pool.take_cached(row, blocks[:usable], gens[:usable])
        return blocks[:usable]

    def free(self, seq_id: int) -> None:
        """Drop a sequence; its blocks go back to the pool (cached content stays reusable)."""
        row = self.row(seq_id)
        del self._rows[seq_id]
        self._row_ids[row] = -1
        count = int(self._caps[row]) >> self._shift
        if self.window_pool is not None:
            self.window_pool.free_row(row, count)
        if count:
            blocks = self._tables[row, :count].tolist()
            self._tables[row, :count] = PAD_BLOCK
            ref, keys, free, evictable = self._ref, self._key, self._free, self._evictable
            # Tail first: the deepest blocks are the least shareable, so they go first.
            for block in reversed(blocks):
                left = ref[block] - 1
                ref[block] = left
                if not left:
                    if keys[block] is None:
                        free.append(block)
                    else:  # registered blocks are exactly the mapped ones
                        evictable[block] = None
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
        count = int(self._caps[parent_row]) >> self._shift
        blocks = self._tables[parent_row, :count]
        self._tables[row, :count] = blocks
        ref = self._ref
        for block in blocks.tolist():
            ref[block] += 1
        if self.window_pool is not None:
            self.window_pool.fork(parent_row, row, count)
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
        """:meth:`ensure` by row."""
        length = int(self._lens[row])
        total = length + num_tokens
        if total > self.max_seq_len:
            raise SequenceTooLong(self._row_ids[row], total, self.max_seq_len)
        count = int(self._caps[row]) >> self._shift
        cow = num_tokens > 0 and row in self._cow
        source = int(self._tables[row, count - 1]) if cow and length & self._mask else -1
        copy = source >= 0 and self._ref[source] > 1
        new = max(((total + self._mask) >> self._shift) - count, 0)
        needed = new + copy
        if needed > len(self._free) + len(self._evictable):
            raise OutOfBlocks(needed, self.num_free_blocks, self.num_blocks)
        pool = self.window_pool
        window_copy = pool is not None and source >= 0 and pool.needs_copy(row, count - 1)
        if pool is not None and new + window_copy > pool.num_free_blocks:
            raise OutOfBlocks(new + window_copy, pool.num_free_blocks, pool.num_blocks)
        copies = []
        if cow:
            self._cow.discard(row)
            if copy:
                (target,) = self._take(1)
                self._ref[source] -= 1
                self._tables[row, count - 1] = target
                copies.append((source, target))
            if pool is not None and window_copy:
                pair = pool.copy_on_write(row, count - 1)
                if pair is not None:
                    self._window_copies.append(pair)
        if new:
            self._tables[row, count : count + new] = self._take(new)
            self._caps[row] = (count + new) << self._shift
            if pool is not None:
                pool.allocate(row, count, new)
        return copies

    def window_blocks_needed_row(self, row: int, num_tokens: int) -> int:
        """New window-pool blocks ``ensure_row(row, num_tokens)`` would allocate."""
        pool = self.window_pool
        if pool is None:
            return 0
        length = int(self._lens[row])
        count = int(self._caps[row]) >> self._shift
        new = max(((length + num_tokens + self._mask) >> self._shift) - count, 0)
        if num_tokens > 0 and row in self._cow and length & self._mask:
            new += pool.needs_copy(row, count - 1)
        return new

    def blocks_needed_row(self, row: int, num_tokens: int) -> int:
        """:meth:`blocks_needed` by row."""
        length = int(self._lens[row])
        count = int(self._caps[row]) >> self._shift
        new = max(((length + num_tokens + self._mask) >> self._shift) - count, 0)
        if num_tokens > 0 and row in self._cow and length & self._mask:
            new += self._ref[int(self._tables[row, count - 1])] > 1
        return new

    def append(self, seq_id: int, num_tokens: int) -> np.ndarray:
        """Mark ``num_tokens`` more tokens of one sequence written; returns their slots."""
        row = self.row(seq_id)
        _, slots = self.append_rows(np.array([row]), np.array([num_tokens]))
        return slots

    def cache_full_blocks(self, seq_id: int, token_ids: TokenIds) -> None:
        """Register the sequence's newly filled blocks for prefix reuse.

        ``token_ids`` must hold (at least) every token written so far. Call it once the
        KV of those tokens is really in the cache (after the step that writes them).
        """
        self.cache_full_blocks_row(self.row(seq_id), token_ids)

    def cache_full_blocks_row(self, row: int, token_ids: TokenIds) -> None:
        """:meth:`cache_full_blocks` by row."""
        full = int(self._lens[row]) >> self._shift
        first = self._hashed[row]
        if first >= full or not self.enable_prefix_caching:
            return
        self._hashed[row] = full
        keys, hashes, gen, register = self._key, self._hash, self._gen, self._register
        blocks = self._tables[row, max(first - 1, 0) : full].tolist()
        if first:
            parent = blocks.pop(0)
            link, parent_hash = (parent << 32) | gen[parent], hashes[parent]
        else:
            link, parent_hash = _NO_PARENT, ROOT_HASH
        data = _as_bytes(token_ids, first << self._shift, full << self._shift)
        stride = self._stride
        pool = self.window_pool
        for index, offset, block in zip(range(first, full), range(0, len(data), stride), blocks,
                                        strict=True):
            if pool is not None and keys[block] is None:
                pool.register(row, index, block, gen[block])
            if keys[block] is None:
                key = data[offset : offset + stride]
                register(block, key, hash((parent_hash, key)), link)
            link, parent_hash = (block << 32) | gen[block], hashes[block]

    def cache_last_blocks_rows(self, rows: np.ndarray, token_buffer: np.ndarray) -> None:
        """Bulk :meth:`cache_full_blocks_row` for rows that each just filled one block.

        ``token_buffer[row]`` holds each row's tokens (the decode path: a few NumPy calls
        for all rows, then one short loop).
        """
        if not self.enable_prefix_caching or not len(rows):
            return
        full = self._lens[rows] >> self._shift
        last = full - 1
        blocks = self._tables[rows, last].tolist()
        parents = self._tables[rows, np.maximum(last - 1, 0)].tolist()
        columns = (last << self._shift)[:, None] + np.arange(self.block_size)
        data = token_buffer[rows[:, None], columns].astype(np.int32, copy=False).tobytes()
        stride = self._stride
        keys, hashes, gen, hashed = self._key, self._hash, self._gen, self._hashed
        register = self._register
        pool = self.window_pool
        for offset, row, index, block, parent in zip(
            range(0, len(data), stride), rows.tolist(), last.tolist(), blocks, parents,
            strict=True,
        ):
            if hashed[row] != index:  # not exactly one new block: take the general path
                self.cache_full_blocks_row(row, token_buffer[row])
                continue
            hashed[row] = index + 1
            if keys[block] is not None:
                continue  # shared with a fork that registered it already
            if pool is not None:
                pool.register(row, index, block, gen[block])
            key = data[offset : offset + stride]
            if index:
                register(block, key, hash((hashes[parent], key)), (parent << 32) | gen[parent])
            else:
                register(block, key, hash((ROOT_HASH, key)), _NO_PARENT)

    # ------------------------------------------------------------------ bulk (rows)

    def seq_lens(self, rows: np.ndarray) -> np.ndarray:
        return self._lens[rows]

    def copy_pending_rows(self) -> list[int]:
        """Rows that may share a partly filled last block (see :meth:`fork`)."""
        return list(self._cow)

    def grow_rows(self, rows: np.ndarray) -> None:
        """Give each of ``rows`` (all full to the last slot, no copy pending) one new block
        (in both pools)."""
        if len(rows) > len(self._free) + len(self._evictable):
            raise OutOfBlocks(len(rows), self.num_free_blocks, self.num_blocks)
        pool = self.window_pool
        if pool is not None and len(rows) > pool.num_free_blocks:
            raise OutOfBlocks(len(rows), pool.num_free_blocks, pool.num_blocks)
        caps = self._caps[rows]
        if (caps != self._lens[rows]).any() or (caps >= self.max_seq_len).any():
            raise SlotsNotReserved([self._row_ids[r] for r in rows.tolist()])
        self._tables[rows, caps >> self._shift] = self._take(len(rows))
        if pool is not None:
            pool.grow(rows, caps >> self._shift)
        self._caps[rows] = caps + self.block_size

    def append_rows(
        self, rows: np.ndarray, counts: np.ndarray | None = None, *, check: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mark tokens written for distinct ``rows``; returns (positions, slots), int32.

        ``counts`` tokens per row (None = one each, the decode case), in row order. Slots
        must have been reserved (:meth:`ensure_row`, :meth:`grow_rows`); ``check=False``
        skips verifying that, for a caller that has just reserved them.
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
        late = end > self._caps[rows] if check else None
        if late is not None and late.any():
            raise SlotsNotReserved([self._row_ids[r] for r in rows[late].tolist()])
        slots = self._tables[token_rows, positions >> self._shift]
        slots <<= self._shift
        slots += positions & self._mask
        self._lens[rows] = end
        return positions, slots

    def block_tables(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Block tables of ``rows`` as an int32 ``[len(rows), width]`` array (padded)."""
        return self._tables[rows, :width]

    # ------------------------------------------------------------------ the window pool

    def window_block_tables(self, rows: np.ndarray, width: int) -> np.ndarray | None:
        """The window pool's tables of ``rows`` (entries before each window: PAD_BLOCK), or
        None without a window pool."""
        pool = self.window_pool
        return None if pool is None else pool.tables[rows, :width]

    def window_slots(self, token_rows: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
        """Window-pool slots of tokens at ``positions`` of ``token_rows``, or None."""
        pool = self.window_pool
        if pool is None:
            return None
        slots = pool.tables[token_rows, positions >> self._shift]
        slots <<= self._shift
        slots += positions & self._mask
        return slots

    def slide_windows(self, rows: np.ndarray) -> int:
        """Release the window blocks ``rows`` can no longer read; returns how many."""
        pool = self.window_pool
        return 0 if pool is None else pool.slide(rows, self._lens[rows])

    def take_window_copies(self) -> list[tuple[int, int]]:
        """Window-pool copy-on-write pairs collected since the last call."""
        copies, self._window_copies = self._window_copies, []
        return copies

    def window_block_table(self, seq_id: int) -> tuple[int, np.ndarray]:
        """(first entry held, the window blocks held from there) of a sequence."""
        pool = self.window_pool
        if pool is None:
            raise ValueError("no window pool")
        row = self.row(seq_id)
        first = int(pool.first[row])
        return first, pool.tables[row, first:int(self._caps[row]) >> self._shift].copy()

    # ------------------------------------------------------------------ blocks

    def _take(self, count: int) -> list[int]:
        """Allocate ``count`` blocks (the caller checked there are enough)."""
        free = self._free
        if count <= len(free):
            if count == 1:
                blocks = [free.pop()]
            else:
                blocks = free[-count:]
                del free[-count:]
                blocks.reverse()
        else:
            blocks = free[::-1]
            free.clear()
            popitem, cache, keys, hashes, gen = (
                self._evictable.popitem, self._cache, self._key, self._hash, self._gen
            )
            pool = self.window_pool
            for _ in range(count - len(blocks)):
                block, _ = popitem(last=False)
                del cache[hashes[block]]  # evictable blocks are exactly the mapped ones
                if pool is not None:
                    pool.forget(block, gen[block])
                keys[block] = None
                gen[block] += 1
                blocks.append(block)
        ref = self._ref
        for block in blocks:
            ref[block] = 1
        return blocks

    def _register(self, block: int, key: bytes, block_hash: int, link: int) -> None:
        """Enter full ``block`` (token ids ``key``, chain hash ``block_hash``, parent
        ``link``) in the prefix cache."""
        self._key[block] = key
        self._hash[block] = block_hash
        self._link[block] = link
        if block_hash in self._cache:
            self._map(block_hash, block)
        else:
            self._cache[block_hash] = block

    def _map(self, block_hash: int, block: int) -> None:
        """Make ``block`` the cached copy of its content (the newest copy wins).

        Keeps "registered == mapped": the copy it replaces forgets its content.
        """
        old = self._cache.get(block_hash)
        if old is not None and old != block:
            self._forget(old)
            if not self._ref[old]:
                del self._evictable[old]
                self._free.append(old)
        self._cache[block_hash] = block

    def _forget(self, block: int) -> None:
        """Drop a block's registered content (children linked to it stop matching)."""
        block_hash = self._hash[block]
        if self._cache.get(block_hash) == block:
            del self._cache[block_hash]
        if self.window_pool is not None:
            self.window_pool.forget(block, self._gen[block])
        self._key[block] = None
        self._gen[block] += 1


def _as_bytes(token_ids: TokenIds, start: int, end: int) -> bytes:
    part = token_ids[start:end]
    if isinstance(part, np.ndarray) and part.dtype == np.int32:
        return part.tobytes()
    return np.asarray(part, dtype=np.int32).tobytes()


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise EngineConfigError(name, value, "must be a positive integer")
