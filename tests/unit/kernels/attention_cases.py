"""Paged test batches (NaN in every unused slot) and naive dense attention, for the kernel tests.

Plain NumPy (no hypothesis) so that the GPU tests can use it on machines with numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from velod.kernels.layout import from_float32, to_float32

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
# ‖out − dense‖ / ‖dense‖ bounds: float32 math, then one rounding to the output type.
TOLERANCE = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


@dataclass
class PagedCase:
    """A paged batch plus the same tokens laid out densely, per sequence."""

    query: np.ndarray
    key_cache: np.ndarray
    value_cache: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    dense_keys: list[np.ndarray]    # [n, kv, d] float64, per sequence
    dense_values: list[np.ndarray]
    scale: float


def make_case(rng: np.random.Generator, lengths: list[int], num_kv_heads: int, group: int,
              head_dim: int, block_size: int, dtype: str = "float32",
              keep_dense: bool = True) -> PagedCase:
    """Random tokens scattered over shuffled blocks; everything unused is NaN or garbage."""
    store = DTYPES[dtype]
    needed = [-(-n // block_size) for n in lengths]
    spare = int(rng.integers(0, 4))
    num_blocks = sum(needed) + spare
    max_blocks = max(needed, default=0) + int(rng.integers(0, 3))
    nan = from_float32(np.full((), np.nan, np.float32), store)
    key_cache = np.full((num_blocks, block_size, num_kv_heads, head_dim), nan, dtype=store)
    value_cache = key_cache.copy()
    # Entries past a sequence's last block must never be read: make them invalid indices.
    block_tables = np.full((len(lengths), max_blocks), -(2**31), dtype=np.int32)
    block_tables[:, ::2] = 2**31 - 1
    order = rng.permutation(num_blocks)
    dense_keys, dense_values = [], []
    used = 0
    for seq, length in enumerate(lengths):
        blocks = order[used:used + needed[seq]]
        used += needed[seq]
        block_tables[seq, :needed[seq]] = blocks
        row = (length, num_kv_heads, head_dim)
        keys = from_float32(rng.standard_normal(row, dtype=np.float32), store)
        values = from_float32(rng.standard_normal(row, dtype=np.float32), store)
        positions = np.arange(length)
        key_cache[blocks[positions // block_size], positions % block_size] = keys
        value_cache[blocks[positions // block_size], positions % block_size] = values
        if keep_dense:  # float64 copies are large for long contexts; the GPU tests skip them
            dense_keys.append(to_float32(keys).astype(np.float64))
            dense_values.append(to_float32(values).astype(np.float64))
    query = from_float32(rng.standard_normal((len(lengths), num_kv_heads * group, head_dim),
                                             dtype=np.float32), store)
    return PagedCase(query, key_cache, value_cache, block_tables,
                     np.array(lengths, dtype=np.int32), dense_keys, dense_values,
                     float(head_dim ** -0.5))


def dense_attention(case: PagedCase) -> np.ndarray:
    """softmax(scale · q·Kᵀ)·V per sequence and head, float64, from the dense copies."""
    query = to_float32(case.query).astype(np.float64)
    num_seqs, num_heads, head_dim = query.shape
    group = num_heads // case.key_cache.shape[2]
    out = np.zeros((num_seqs, num_heads, head_dim))
    for seq in range(num_seqs):
        if case.context_lens[seq] == 0:
            continue
        for head in range(num_heads):
            keys = case.dense_keys[seq][:, head // group]
            values = case.dense_values[seq][:, head // group]
            scores = keys @ query[seq, head] * case.scale
            weights = np.exp(scores - scores.max())
            out[seq, head] = weights @ values / weights.sum()
    return out


def relative_error(out: np.ndarray, expected: np.ndarray) -> float:
    out = to_float32(out).astype(np.float64)
    assert not np.isnan(out).any(), "NaN in the output: a slot outside the context was read"
    return float(np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30))
