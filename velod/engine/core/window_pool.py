"""The second block pool: KV blocks of a model's sliding-window layers, freed once out of sight.

A sliding-window layer's query at position ``p`` attends positions ``p - window + 1 .. p``, so
once a sequence's next query is at ``L`` (``L`` tokens in the cache) its windowed layers never
read a block that lies wholly before ``L - window + 1`` again. Those layers' K/V live in blocks
of their own, from this pool, in a block table of their own with the same indexing as the
full-attention table (entry ``i`` holds positions ``i * block_size ..``): entries before the
window are released (:meth:`WindowPool.slide`) and hold :data:`PAD_BLOCK`, which the kernels
never read since they start at the window. A sequence thus holds about ``window`` tokens of
windowed-layer cache however long it grows, as llama.cpp sizes its sliding-window cache.

The :class:`~velod.engine.core.block_manager.BlockManager` owns one of these when the model
has windowed layers and keeps it in step with its rows (allocation at the same indices,
copy-on-write, release on free or preemption).

Prefix caching: a full block registered in the block manager identifies its whole prefix
exactly (by its id and content generation), so a windowed block is cached under the key
``(full block, generation)`` of the same position. A new sequence that hits ``h`` full blocks
in the prefix cache also needs the windowed blocks its next query can see; when some of those
were evicted, the hit is shortened to the longest one whose window is still all cached
(:meth:`WindowPool.usable_hits`).
"""

from __future__ import annotations

import numpy as np

from velod.engine.core.block_pool import BlockPool

PAD_BLOCK = 0
"""Block id in table entries that are released or not allocated (never read)."""

_Key = tuple[int, int]  # (full block, its content generation)


class WindowPool(BlockPool):
    """Blocks of the sliding-window layers, with per-row tables and their own prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, window: int, *, max_seqs: int,
                 max_blocks_per_seq: int) -> None:
        super().__init__(num_blocks, block_size)
        self.window = window
        self._cache: dict[_Key, int] = {}
        self._key: list[_Key | None] = [None] * num_blocks
        self.tables = np.full((max_seqs, max_blocks_per_seq), PAD_BLOCK, dtype=np.int32)
        self.first = np.zeros(max_seqs, dtype=np.int32)  # first entry each row still holds

    # ------------------------------------------------------------------ queries

    def first_needed(self, lengths: np.ndarray) -> np.ndarray:
        """The first table entry a row of ``lengths`` cached tokens can still read: its next
        query at position ``length`` sees ``length - window + 1`` onwards."""
        return np.maximum(lengths.astype(np.int64) - self.window + 1, 0) >> self._shift

    def blocks_for_chunk(self, num_tokens: int) -> int:
        """The most blocks one row holds while ``num_tokens`` new tokens are computed (its
        window before them plus the chunk, copy-on-write included)."""
        return -(-(self.window + num_tokens - 2) // self.block_size) + 2

    def max_chunk(self) -> int:
        """The longest prompt chunk one row can compute alone in the whole pool."""
        return (self.num_blocks - 2) * self.block_size - self.window + 2

    # ------------------------------------------------------------------ rows

    def allocate(self, row: int, start: int, count: int) -> None:
        """Entries ``start .. start + count - 1`` of ``row`` get fresh blocks (checked by
        the caller: ``count <= num_free_blocks``)."""
        if count:
            self.tables[row, start:start + count] = self._take(count)

    def grow(self, rows: np.ndarray, indices: np.ndarray) -> None:
        """Entry ``indices[i]`` of each of ``rows`` gets a fresh block (checked by the caller)."""
        self.tables[rows, indices] = self._take(len(rows))

    def copy_on_write(self, row: int, index: int) -> tuple[int, int] | None:
        """Give ``row`` its own copy of the shared block at ``index``; the (source, copy)
        pair to perform, or None when the block is not shared."""
        source = int(self.tables[row, index])
        if self._ref[source] <= 1:
            return None
        (target,) = self._take(1)
        self._ref[source] -= 1
        self.tables[row, index] = target
        return source, target

    def needs_copy(self, row: int, index: int) -> bool:
        return self._ref[int(self.tables[row, index])] > 1

    def slide(self, rows: np.ndarray, lengths: np.ndarray) -> int:
        """Release, for each of ``rows`` with ``lengths`` cached tokens, the blocks its next
        query can no longer see; returns how many entries were released."""
        if not len(rows):
            return 0
        first = self.first_needed(lengths)
        moved = np.flatnonzero(first > self.first[rows])
        released = 0
        for i in moved.tolist():
            row = int(rows[i])
            released += self._release(row, int(self.first[row]), int(first[i]))
            self.first[row] = first[i]
        return released

    def free_row(self, row: int, count: int) -> None:
        """Release every block ``row`` still holds (its table has ``count`` entries)."""
        self._release(row, int(self.first[row]), count)
        self.first[row] = 0

    def fork(self, parent: int, child: int, count: int) -> None:
        """``child`` shares every block ``parent`` holds."""
        first = int(self.first[parent])
        blocks = self.tables[parent, first:count]
        self.tables[child, first:count] = blocks
        self.first[child] = first
        for block in blocks.tolist():
            self._ref[block] += 1

    def _release(self, row: int, start: int, stop: int) -> int:
        if stop <= start:
            return 0
        blocks = self.tables[row, start:stop].tolist()
        self.tables[row, start:stop] = PAD_BLOCK
        ref, keys, free, evictable = self._ref, self._key, self._free, self._evictable
        for block in reversed(blocks):  # the deepest are the least shareable: evicted first
            left = ref[block] - 1
            ref[block] = left
            if not left:
                if keys[block] is None:
                    free.append(block)
                else:
                    evictable[block] = None
        return len(blocks)

    # ------------------------------------------------------------------ prefix cache

    def register(self, row: int, index: int, full_block: int, generation: int) -> None:
        """Entry ``index`` of ``row`` holds the windowed K/V of the same tokens as
        ``full_block`` (in its content ``generation``): cache it under that key."""
        if index < self.first[row]:
            return  # already released (never: registration follows the step that filled it)
        block = int(self.tables[row, index])
        if self._key[block] is not None:
            return  # shared with a fork that registered it
        key = (full_block, generation)
        old = self._cache.get(key)
        if old is not None and old != block:
            self._drop(old)
        self._key[block] = key
        self._cache[key] = block

    def forget(self, full_block: int, generation: int) -> None:
        """The full block's content is gone: its windowed twin can no longer be hit."""
        block = self._cache.get((full_block, generation))
        if block is not None:
            self._drop(block)

    def usable_hits(self, full_blocks: list[int], generations: list[int]) -> int:
        """The longest prefix of ``full_blocks`` (a prefix-cache hit) whose window is cached:
        ``h`` such that every windowed block the next query at ``h * block_size`` reads is
        here."""
        cached = [(block, gen) in self._cache for block, gen in zip(full_blocks, generations,
                                                                     strict=True)]
        hits = len(full_blocks)
        while hits:
            first = int(self.first_needed(np.array([hits << self._shift]))[0])
            missing = [i for i in range(first, hits) if not cached[i]]
            if not missing:
                return hits
            hits = missing[-1]  # a hit must end before the last missing block
        return 0

    def take_cached(self, row: int, full_blocks: list[int], generations: list[int]) -> None:
        """``row`` starts with the cached windowed blocks of a ``len(full_blocks)``-block hit
        (:meth:`usable_hits` said they are all here)."""
        hits = len(full_blocks)
        first = int(self.first_needed(np.array([hits << self._shift]))[0])
        ref = self._ref
        for i in range(first, hits):
            block = self._cache[(full_blocks[i], generations[i])]
            if ref[block] == 0:
                del self._evictable[block]
            ref[block] += 1
            self.tables[row, i] = block
        self.first[row] = first

    # ------------------------------------------------------------------ blocks

    def _take(self, count: int) -> list[int]:
        free = self._free
        blocks = []
        while len(blocks) < count and free:
            blocks.append(free.pop())
        while len(blocks) < count:
            block, _ = self._evictable.popitem(last=False)
            key = self._key[block]
            if key is not None and self._cache.get(key) == block:
                del self._cache[key]
            self._key[block] = None
            blocks.append(block)
        for block in blocks:
            self._ref[block] = 1
        return blocks

    def _drop(self, block: int) -> None:
        """Forget a block's cached content; an unreferenced one goes back to the free stack."""
        key = self._key[block]
        if key is not None and self._cache.get(key) == block:
            del self._cache[key]
        self._key[block] = None
        if not self._ref[block] and block in self._evictable:
            del self._evictable[block]
            self._free.append(block)
