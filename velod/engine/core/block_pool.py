"""The bookkeeping both KV block pools share: reference counts, a free stack, the cached ones.

:class:`~velod.engine.core.block_manager.BlockManager` (the full-attention pool) and
:class:`~velod.engine.core.window_pool.WindowPool` (the sliding-window layers' pool) each
allocate from one of these: a block is referenced by sequences (count > 0), on the free
stack, or evictable (count 0, its content kept for a prefix-cache hit, least recently used
first).
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` slots, and what each block is doing."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() returns block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, ref 0, LRU first

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

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def free_block_ids(self) -> list[int]:
        """Blocks on the free stack (the last one is reused first)."""
        return list(self._free)

    def cached_block_ids(self) -> list[int]:
        """Evictable cached blocks, least recently used first."""
        return list(self._evictable)
