"""NumPy paged attention: the engine's CPU path and the oracle for the CUDA kernels.

Same arguments and layouts as the kernels (see ``velod.kernels.layout``). Whatever sits in
unused slots or blocks (NaN in the tests) never reaches the output: it is masked out of the
scores and zeroed in the values before they are weighted. All arithmetic is float32.

Decode (``paged_attention``, one query row per sequence) and prefill
(``paged_prefill_attention``, a whole prompt chunk per sequence under a causal mask) both
take an optional sliding ``window``.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from velod.kernels.layout import (
    AttentionArgumentError,
    check_attention_args,
    check_block_pairs,
    check_cache_write_args,
    check_context_lens,
    check_prefill_args,
    check_slots,
    from_float32,
    to_float32,
)

# Keys (or values) gathered per pass: small enough to stay in a core's L2 cache between the
# copy out of the paged cache and the matmul that reads it, which is what keeps the paged
# path close to dense attention over contiguous K/V (see bench/numpy_attention.py).
PIECE_BYTES = 1 << 20
# Keys gathered at once for a group of short sequences decoded together (padded to the
# longest): fewer, larger calls for a batch of short contexts.
GROUP_BYTES = 1 << 20
# Scores held at once by a prefill chunk (rows x context floats): bounds its temporaries.
SCORE_BYTES = 16 << 20
# Largest gather kept in a per-thread scratch buffer (see _scratch).
SCRATCH_BYTES = 32 << 20
# Query rows per prefill pass: smaller passes skip more of the causal mask's hidden half,
# larger ones make fewer, bigger matmuls.
PREFILL_ROWS = 128


def _gather(cache: np.ndarray, table_row: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Tokens ``start..stop-1`` of one sequence, float32 ``[kv, n, d]`` (contiguous)."""
    block_size = cache.shape[1]
    positions = np.arange(start, stop)
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


def window_start(context_lens: np.ndarray, window: int | None) -> np.ndarray:
    """The first position each sequence's last token sees (int64): 0, or ``len - window``
    for a sliding window of ``window`` tokens (the token itself and the window - 1 before)."""
    lens = context_lens.astype(np.int64)
    if window is None:
        return np.zeros_like(lens)
    if window < 1:
        raise AttentionArgumentError(f"window must be >= 1 token, got {window}")
    return np.maximum(lens - window, 0)


def _gather_blocks(cache: np.ndarray, ids: np.ndarray, slot: str) -> np.ndarray:
    """Whole blocks ``cache[ids]`` as float32 ``[len(ids) * block_size, kv, d]``, in this
    thread's scratch buffer ``slot`` (valid until the next gather into the same slot)."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= cache.shape[0]):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise AttentionArgumentError(f"block id {bad} is outside the cache's "
                                     f"{cache.shape[0]} blocks")
    rows = _scratch(slot, (len(ids), *cache.shape[1:]), cache.dtype)
    cache.take(ids, axis=0, out=rows, mode="clip")  # checked above; "raise" would buffer
    return to_float32(rows).reshape(-1, *cache.shape[2:])


_local = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A reusable buffer of this thread (contents undefined). A fresh multi-MB array costs
    a page fault per 4 KiB on first touch, more than the copy into it; buffers up to
    SCRATCH_BYTES are kept per thread and name, larger requests get a new array."""
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    if size * dtype.itemsize > SCRATCH_BYTES:
        return np.empty(shape, dtype)
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.size < size:
        buffer = buffers[(name, dtype)] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)


def _block_ids(block_tables: np.ndarray, seqs: np.ndarray, first: np.ndarray,
               counts: np.ndarray, width: int) -> np.ndarray:
    """``[len(seqs), width]`` block ids: each sequence's ``counts`` blocks from ``first``,
    padded with block 0 (whose rows the caller masks); table entries past a sequence's
    blocks are never used as cache indices."""
    cols = first[seqs, None] + np.arange(width)
    inside = np.arange(width) < counts[seqs, None]
    cols = np.minimum(cols, block_tables.shape[1] - 1)
    return np.where(inside, block_tables[seqs[:, None], cols], 0).astype(np.int64)


def _softmax_rows(scores: np.ndarray) -> np.ndarray:
    """exp(scores - max) in place along the last axis; returns the row sums."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return scores.sum(axis=-1, keepdims=True)


def _decode_group(queries: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                  ids: np.ndarray, start: np.ndarray, lo: np.ndarray,
                  lens: np.ndarray) -> np.ndarray:
    """Attention of several short sequences at once, padded to the longest:
    queries ``[G, kv, g, d]``; ``ids`` ``[G, blocks]``; ``start`` the position of each
    sequence's first gathered token; tokens outside ``lo..len-1`` are masked."""
    count = ids.shape[0]
    keys = _gather_blocks(key_cache, ids.reshape(-1), "k").reshape(count, -1,
                                                                  *key_cache.shape[2:])
    values = _gather_blocks(value_cache, ids.reshape(-1), "v").reshape(keys.shape)
    positions = start[:, None] + np.arange(keys.shape[1])
    hidden = (positions < lo[:, None]) | (positions >= lens[:, None])        # [G, n]
    with np.errstate(invalid="ignore", over="ignore"):  # unused slots: masked just below
        scores = np.matmul(queries, keys.transpose(0, 2, 3, 1))              # [G, kv, g, n]
    if hidden.any():
        np.copyto(scores, -np.inf, where=hidden[:, None, None, :])  # also overwrites NaN
        values[hidden] = 0.0  # unused slots may hold anything; 0 weight x NaN is NaN
    total = _softmax_rows(scores)
    return np.matmul(scores, values.transpose(0, 2, 1, 3)) / total


def _decode_long(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                 table_row: np.ndarray, lo: int, length: int) -> np.ndarray:
    """Attention of one long sequence (query ``[kv, g, d]``) over positions ``lo..length-1``,
    gathered a piece of blocks at a time: scores first, then the weighted values."""
    block_size = key_cache.shape[1]
    first, last = lo // block_size, -(-length // block_size)
    per_piece = max(1, PIECE_BYTES // _block_bytes(key_cache))
    offset = first * block_size
    n = last * block_size - offset
    scores = np.empty((*query.shape[:2], n), np.float32)
    pieces = range(first, last, per_piece)
    for b in pieces:
        keys = _gather_blocks(key_cache, table_row[b:min(b + per_piece, last)], "k")
        a = b * block_size - offset
        with np.errstate(invalid="ignore", over="ignore"):  # unused slots: masked below
            np.matmul(query, keys.transpose(1, 2, 0), out=scores[:, :, a:a + keys.shape[0]])
    if lo > offset or length < offset + n:
        scores[:, :, :lo - offset] = -np.inf
        scores[:, :, length - offset:] = -np.inf
    total = _softmax_rows(scores)
    out = np.zeros(query.shape, np.float32)
    for b in pieces:
        values = _gather_blocks(value_cache, table_row[b:min(b + per_piece, last)], "v")
        a = b * block_size - offset
        hidden_before, hidden_after = lo - offset - a, length - offset - a
        if hidden_before > 0:
            values[:hidden_before] = 0.0
        if hidden_after < values.shape[0]:
            values[max(hidden_after, 0):] = 0.0
        out += np.matmul(scores[:, :, a:a + values.shape[0]], values.transpose(1, 0, 2))
    return out / total


def _block_bytes(cache: np.ndarray) -> int:
    """Bytes of one block once in float32 (what a gathered piece occupies)."""
    return math.prod(cache.shape[1:]) * 4


def paged_attention(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_tables: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    *,
    partition_size: int | None = None,
    window: int | None = None,
) -> np.ndarray:
    """Decode attention output ``[num_seqs, num_heads, head_dim]`` in the query's dtype.

    Each sequence's query attends its first ``context_lens`` tokens, or with ``window`` only
    the last ``window`` of them (a sliding-window layer: blocks before the window are never
    read, so the engine may already have freed them). ``partition_size`` computes each
    sequence in partitions merged with log-sum-exp (the flash-decoding path); the result
    equals the single pass up to rounding.
    """
    shape = check_attention_args(query, key_cache, value_cache, block_tables, context_lens)
    check_context_lens(context_lens, shape)
    kv, group, dim = shape.num_kv_heads, shape.group_size, shape.head_dim
    queries = to_float32(query).reshape(shape.num_seqs, kv, group, dim) * np.float32(scale)
    out = np.zeros((shape.num_seqs, kv, group, dim), dtype=np.float32)
    lens = context_lens.astype(np.int64)
    lo = window_start(context_lens, window)
    if partition_size is not None:
        _decode_partitioned(queries, key_cache, value_cache, block_tables, lo, lens,
                            partition_size, out)
    else:
        _decode_pieces(queries, key_cache, value_cache, block_tables, lo, lens, out)
    return from_float32(out.reshape(shape.num_seqs, shape.num_heads, dim), query.dtype)


def _decode_partitioned(queries, key_cache, value_cache, block_tables, lo, lens,
                        partition_size: int, out: np.ndarray) -> None:
    """One sequence at a time, in partitions merged by log-sum-exp (the CUDA path's way)."""
    for seq in range(len(lens)):
        length, start = int(lens[seq]), int(lo[seq])
        if length == 0:
            continue
        k = _gather(key_cache, block_tables[seq], start, length)      # [kv, n, d]
        v = _gather(value_cache, block_tables[seq], start, length)
        if partition_size >= length - start:
            out[seq] = _attend_single(queries[seq], k, v)
        else:
            out[seq] = _attend_partitioned(queries[seq], k, v, partition_size)


def _decode_pieces(queries, key_cache, value_cache, block_tables, lo, lens,
                   out: np.ndarray) -> None:
    """Long sequences alone, a piece of blocks at a time; short ones together, as many as
    fill a group when padded to the longest of them."""
    block_size = key_cache.shape[1]
    first = lo // block_size
    counts = np.where(lens > 0, -(-lens // block_size) - first, 0)
    per_piece = max(1, PIECE_BYTES // _block_bytes(key_cache))
    per_group = max(1, GROUP_BYTES // _block_bytes(key_cache))
    order = np.argsort(counts, kind="stable")
    order = order[counts[order] > 0]
    for seq in order[counts[order] > per_piece].tolist():
        out[seq] = _decode_long(queries[seq], key_cache, value_cache, block_tables[seq],
                                int(lo[seq]), int(lens[seq]))
    short = order[counts[order] <= per_piece]
    i = 0
    while i < len(short):
        j = i + 1  # sorted by count: the last one taken is the widest
        while j < len(short) and (j - i + 1) * int(counts[short[j]]) <= per_group:
            j += 1
        seqs = short[i:j]
        ids = _block_ids(block_tables, seqs, first, counts, int(counts[seqs].max()))
        out[seqs] = _decode_group(queries[seqs], key_cache, value_cache, ids,
                                  first[seqs] * block_size, lo[seqs], lens[seqs])
        i = j


def paged_prefill_attention(
    query: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    block_tables: np.ndarray,
    query_start_loc: np.ndarray,
    context_lens: np.ndarray,
    scale: float,
    *,
    window: int | None = None,
) -> np.ndarray:
    """Causal attention of whole prompt chunks, ``[num_tokens, num_heads, head_dim]``.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``: the last
    tokens of its first ``context_lens[s]`` (their K/V already in the cache, written this
    step). Query ``i`` at position ``p`` attends positions ``0..p`` (with ``window``,
    ``p - window + 1..p``) over the sequence's earlier blocks and the chunk itself, all in
    one masked matmul per sequence; a query of one row is a decode row.
    """
    shape = check_prefill_args(query, key_cache, value_cache, block_tables, query_start_loc,
                               context_lens)
    if window is not None and window < 1:
        raise AttentionArgumentError(f"window must be >= 1 token, got {window}")
    starts = query_start_loc.astype(np.int64)
    qlens, lens = np.diff(starts), context_lens.astype(np.int64)
    rows = query.shape[0]
    kv, group, dim = shape.num_kv_heads, shape.group_size, shape.head_dim
    block_size = shape.block_size
    queries = to_float32(query).reshape(rows, kv, group, dim) * np.float32(scale)
    out = np.zeros((rows, kv, group, dim), np.float32)
    for seq in range(shape.num_seqs):
        count, length = int(qlens[seq]), int(lens[seq])
        if count == 0:
            continue
        first_query = length - count
        lo = 0 if window is None else max(first_query - window + 1, 0)
        first, last = lo // block_size, -(-length // block_size)
        offset = first * block_size
        ids = block_tables[seq, first:last].astype(np.int64)
        keys = _gather_blocks(key_cache, ids, "k")                       # [n, kv, d]
        values = _gather_blocks(value_cache, ids, "v")
        n = keys.shape[0]
        positions = offset + np.arange(n)
        if lo > offset or length < offset + n:
            values[(positions < lo) | (positions >= length)] = 0.0
        keys_t = keys.transpose(1, 2, 0)                                 # [kv, d, n]
        values_t = values.transpose(1, 0, 2)                             # [kv, n, d]
        # Rows go in passes; each pass reads only the keys its rows can see (causal: none
        # past its last row; windowed: none before its first row's window), which skips
        # about half of a long prompt's scores.
        per_pass = min(PREFILL_ROWS, max(1, SCORE_BYTES // (4 * kv * group * n)))
        a = int(starts[seq])
        for q0 in range(0, count, per_pass):
            q1 = min(q0 + per_pass, count)
            k0 = 0 if window is None else max(first_query + q0 - window + 1 - offset, 0)
            k1 = first_query + q1 - offset                               # exclusive
            span = positions[k0:k1]
            q_pos = first_query + np.arange(q0, q1)
            hidden = span[None, :] > q_pos[:, None]                      # [r, n] causal
            if window is not None:
                hidden |= span[None, :] <= q_pos[:, None] - window
            # [r, kv, g, d] -> [kv, r*g, d]: one matmul per kv head for all rows
            q = queries[a + q0:a + q1].transpose(1, 0, 2, 3).reshape(kv, -1, dim)
            scores = np.matmul(q, keys_t[:, :, k0:k1]).reshape(kv, q1 - q0, group, k1 - k0)
            np.copyto(scores, -np.inf, where=hidden[None, :, None, :])
            total = _softmax_rows(scores)
            result = np.matmul(scores.reshape(kv, -1, k1 - k0), values_t[:, k0:k1])
            out[a + q0:a + q1] = (result.reshape(kv, q1 - q0, group, dim) / total
                                  ).transpose(1, 0, 2, 3)
    return from_float32(out.reshape(rows, kv * group, dim), query.dtype)


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
