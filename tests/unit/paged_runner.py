"""A minimal paged driver for a model, as the engine step will drive it (phase 2 wires the
real Engine): per step the flat tokens of several sequences, a per-layer KV cache of shuffled
blocks, cache writes, then paged prefill attention over each sequence's chunk (or, when every
sequence brings one token, the decode kernel), each layer with its own window and scale.

Blocks are handed out from a shuffled free list and every unused slot holds NaN, so a read of
anything outside a sequence's context shows up as NaN in the logits. With
``poison_outside_window`` each windowed layer's blocks that lie wholly before every query's
window are overwritten with NaN after each step, as if the engine had freed and reused them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from velod.kernels import reference
from velod.kernels.layout import from_float32


@dataclass
class _Seq:
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


class PagedRunner:
    def __init__(self, model, *, block_size: int = 4, num_blocks: int = 256, seed: int = 0,
                 poison_outside_window: bool = False, decode_kernel: bool = True) -> None:
        self.model = model
        self.block_size = block_size
        shape = (num_blocks, block_size, model.kv_heads, model.head_dim)
        dtype = getattr(model, "dtype", np.dtype(np.float32))  # the model's cache type
        self.nan = from_float32(np.full((), np.nan, np.float32), dtype)
        self.keys = [np.full(shape, self.nan, dtype) for _ in range(model.layers)]
        self.values = [np.full(shape, self.nan, dtype) for _ in range(model.layers)]
        self.free = list(np.random.default_rng(seed).permutation(num_blocks))
        self.seqs: dict[int, _Seq] = {}
        self.poison = poison_outside_window
        self.decode_kernel = decode_kernel

    def step(self, work: list[tuple[int, list[int]]]) -> dict[int, np.ndarray]:
        """Appends each ``(seq_id, tokens)`` and returns every sequence's last logits."""
        bs = self.block_size
        tokens, positions, slots, starts, lens = [], [], [], [0], []
        for seq_id, new in work:
            seq = self.seqs.setdefault(seq_id, _Seq())
            first = len(seq.tokens)
            seq.tokens.extend(new)
            while len(seq.blocks) * bs < len(seq.tokens):
                seq.blocks.append(int(self.free.pop()))
            for p in range(first, len(seq.tokens)):
                slots.append(seq.blocks[p // bs] * bs + p % bs)
            tokens.extend(new)
            positions.extend(range(first, len(seq.tokens)))
            starts.append(len(tokens))
            lens.append(len(seq.tokens))
        width = max(len(self.seqs[s].blocks) for s, _ in work)
        tables = np.full((len(work), width), -(2**31), np.int32)  # past the end: invalid
        for row, (seq_id, _) in enumerate(work):
            blocks = self.seqs[seq_id].blocks
            tables[row, :len(blocks)] = blocks
        starts_a = np.array(starts, np.int32)
        lens_a = np.array(lens, np.int32)
        sample = starts_a[1:] - 1
        model = self.model
        model.begin_step(np.array(tokens, np.int32), np.array(positions, np.int32), sample)
        decode = self.decode_kernel and all(len(new) == 1 for _, new in work)
        for layer in range(model.layers):
            q, k, v = model.layer_qkv(layer)
            reference.write_cache(k, v, self.keys[layer], self.values[layer],
                                  np.array(slots, np.int64))
            attn = model.layer_attention(layer)
            if decode:
                out = reference.paged_attention(q, self.keys[layer], self.values[layer], tables,
                                                lens_a, attn.scale, window=attn.window)
            else:
                out = reference.paged_prefill_attention(q, self.keys[layer], self.values[layer],
                                                        tables, starts_a, lens_a, attn.scale,
                                                        window=attn.window)
            model.layer_output(layer, out)
        logits = model.logits(sample)
        if self.poison:
            self._poison_outside_windows()
        return {seq_id: logits[row] for row, (seq_id, _) in enumerate(work)}

    def _poison_outside_windows(self) -> None:
        bs = self.block_size
        for layer in range(self.model.layers):
            window = self.model.layer_attention(layer).window
            if window is None:
                continue
            for seq in self.seqs.values():
                # The next query is at position len(tokens): it sees len - window + 1 onwards.
                first_visible = len(seq.tokens) - window + 1
                for block in seq.blocks[:max(first_visible, 0) // bs]:
                    self.keys[layer][block] = self.nan
                    self.values[layer][block] = self.nan
