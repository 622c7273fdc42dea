"""NumPy paged attention: the engine's CPU path and the oracle for the CUDA kernels.

Same arguments and layouts as the kernels (see ``velod.kernels.layout``). Only the slots inside
each sequence's context are gathered, so whatever sits in unused slots or blocks (NaN in the
tests) never reaches the output. All arithmetic is float32.
"""

from __future__ import annotations

import numpy as np

from velod.kernels.layout import (
    check_attention_args,
    check_block_pairs,
    check_cache_write_args,
    check_context_lens,
    check_slots,
    from_float32,
    to_float32,
)


def _gather(cache: np.ndarray, table_row: np.ndarray, length: int) -> np.ndarray:
    """The first ``length`` tokens' rows of one sequence, float32 ``[kv, n, d]`` (contiguous)."""
    block_size = cache.shape[1]
    positions = np.arange(length)
    blocks = table_row[positions // block_size].astype(np.int64)
    if cache.flags.c_contiguous:  # one flat take: much faster than two-axis fancy indexing
        flat = cache.reshape(-1, *cache.shape[2:])
        rows = flat.take(blocks * block_size + positions % block_size, axis=0)
    else:
        rows = cache[blocks, positions % block_size]
    return to_float32(np.ascontiguousarray(rows.transpose(1, 0, 2)))


def _attend_single(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ)·v for q [kv, g, d] (already scaled), k and v [kv, n, d]."""
    scores = np.matmul(q, k.transpose(0, 2, 1))                      # [kv, g, n] (BLAS)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out = np.matmul(weights, v)                                      # [kv, g, d]
    return out / weights.sum(axis=-1, keepdims=True)


def _attend_partitioned(q: np.ndarray, k: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """The same result computed per partition of ``size`` tokens and merged by log-sum-exp,
    as the split CUDA path does."""
    n = k.shape[1]
    parts = -(-n // size)
    pad = parts * size - n
    scores = np.matmul(q, k.transpose(0, 2, 1))
    scores = np.pad(scores, ((0, 0), (0, 0), (0, pad)), constant_values=-np.inf)
    scores = scores.reshape(*scores.shape[:2], parts, size)          # [kv, g, p, t]
    v_parts = np.pad(v, ((0, 0), (0, pad), (0, 0))).reshape(v.shape[0], parts, size, -1)
    part_max = scores.max(axis=-1)                                   # [kv, g, p], finite
    weights = np.exp(scores - part_max[..., None])                   # padding -> 0
    part_sum = weights.sum(axis=-1)
    part_out = np.einsum("hgpt,hptd->hgpd", weights, v_parts) / part_sum[..., None]
    overall = part_max.max(axis=-1, keepdims=True)
    scale = part_sum * np.exp(part_max - overall)                    # [kv, g, p]
    return np.einsum("hgp,hgpd->hgd", scale, part_out) / scale.sum(axis=-1)[..., None]


def paged_attention(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_tables: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    *,
    partition_size: int | None = None,
) -> np.ndarray:
    """Decode attention output ``[num_seqs, num_heads, head_dim]`` in the query's dtype.

    ``partition_size`` computes each sequence in partitions merged with log-sum-exp (the
    flash-decoding path); the result equals the single pass up to rounding.
    """
    shape = check_attention_args(query, key_cache, value_cache, block_tables, context_lens)
    check_context_lens(context_lens, shape)
    kv, group, dim = shape.num_kv_heads, shape.group_size, shape.head_dim
    queries = to_float32(query).reshape(shape.num_seqs, kv, group, dim) * np.float32(scale)
    out = np.zeros((shape.num_seqs, kv, group, dim), dtype=np.float32)
    for seq in range(shape.num_seqs):
        length = int(context_lens[seq])
        if length == 0:
            continue
        k = _gather(key_cache, block_tables[seq], length)             # [kv, n, d]
        v = _gather(value_cache, block_tables[seq], length)
        if partition_size is None or partition_size >= length:
            out[seq] = _attend_single(queries[seq], k, v)
        else:
            out[seq] = _attend_partitioned(queries[seq], k, v, partition_size)
    return from_float32(out.reshape(shape.num_seqs, shape.num_heads, dim), query.dtype)


def write_cache(
    key: np.ndarray,
    value: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    slot_mapping: np.ndarray,
) -> None:
    """Stores token ``i``'s K and V rows ``[num_kv_heads, head_dim]`` in slot
    ``slot_mapping[i]`` of the caches, in place; negative slots are skipped."""
    check_cache_write_args(key, value, key_cache, value_cache, slot_mapping)
    num_blocks, block_size = key_cache.shape[:2]
    check_slots(slot_mapping, num_blocks * block_size)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].astype(np.int64)
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep]
    value_cache[blocks, offsets] = value[keep]


def copy_blocks(key_cache: np.ndarray, value_cache: np.ndarray, block_pairs: np.ndarray) -> None:
    """Copies whole blocks ``source -> destination`` for each row of ``block_pairs``, in place."""
    check_block_pairs(block_pairs, key_cache.shape[0])
    if block_pairs.size == 0:
        return
    sources, destinations = block_pairs[:, 0], block_pairs[:, 1]
    key_cache[destinations] = key_cache[sources]
    value_cache[destinations] = value_cache[sources]
