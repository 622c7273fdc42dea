"""Paged prefill attention and sliding-window decode against naive dense attention."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.kernels.attention_cases import DTYPES, TOLERANCE, make_case, relative_error
from velod.kernels import AttentionArgumentError, reference
from velod.kernels.layout import from_float32, to_float32


def dense_chunks(case, query, query_lens, window):
    """Each sequence's last ``query_lens`` tokens attending causally (and within ``window``)
    over its dense keys and values, float64."""
    q = to_float32(query).astype(np.float64)
    group = q.shape[1] // case.key_cache.shape[2]
    out = np.zeros(q.shape)
    row = 0
    for seq, count in enumerate(query_lens):
        length = int(case.context_lens[seq])
        for i in range(count):
            p = length - count + i
            lo = 0 if window is None else max(0, p - window + 1)
            for head in range(q.shape[1]):
                keys = case.dense_keys[seq][lo:p + 1, head // group]
                values = case.dense_values[seq][lo:p + 1, head // group]
                scores = keys @ q[row, head] * case.scale
                weights = np.exp(scores - scores.max())
                out[row, head] = weights @ values / weights.sum()
            row += 1
    return out


def prefill_case(rng, lengths, chunk_fractions, **shape):
    case = make_case(rng, lengths, **shape)
    query_lens = [max(1, round(n * f)) if n else 0 for n, f in zip(lengths, chunk_fractions,
                                                                    strict=True)]
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    heads = case.query.shape[1]
    query = from_float32(rng.standard_normal((int(starts[-1]), heads, case.query.shape[2]),
                                             dtype=np.float32), case.query.dtype)
    return case, query, query_lens, starts


prefill_shapes = st.fixed_dictionaries({
    "lengths": st.lists(st.integers(1, 120), min_size=1, max_size=4),
    "num_kv_heads": st.sampled_from([1, 2]),
    "group": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([8, 16, 64]),
    "block_size": st.sampled_from([1, 8, 16]),
    "dtype": st.sampled_from(sorted(DTYPES)),
    "seed": st.integers(0, 2**32 - 1),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill_shapes, st.data())
def test_prefill_chunks_match_dense_causal_attention(shape, data):
    rng = np.random.default_rng(shape.pop("seed"))
    fractions = data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(shape["lengths"]),
                                   max_size=len(shape["lengths"])))
    window = data.draw(st.one_of(st.none(), st.integers(1, 64)))
    case, query, query_lens, starts = prefill_case(rng, shape["lengths"], fractions,
                                                   **{k: v for k, v in shape.items()
                                                      if k != "lengths"})
    out = reference.paged_prefill_attention(query, case.key_cache, case.value_cache,
                                            case.block_tables, starts, case.context_lens,
                                            case.scale, window=window)
    assert out.shape == query.shape and out.dtype == query.dtype
    expected = dense_chunks(case, query, query_lens, window)
    assert relative_error(out, expected) < TOLERANCE[shape["dtype"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill_shapes, st.integers(1, 64), st.booleans())
def test_sliding_window_decode_matches_dense_window(shape, window, partitioned):
    case = make_case(np.random.default_rng(shape.pop("seed")), **shape)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale,
                                    window=window, partition_size=16 if partitioned else None)
    expected = dense_chunks(case, case.query, [1 if n else 0 for n in shape["lengths"]], window)
    assert relative_error(out, expected) < TOLERANCE[shape["dtype"]]


def test_decode_of_one_long_sequence_in_pieces_matches_dense(monkeypatch):
    # Pieces of 2 blocks: the long-sequence path, its masks at both ends, several pieces.
    monkeypatch.setattr(reference, "PIECE_BYTES", 2 * 8 * 2 * 16 * 4)
    case = make_case(np.random.default_rng(7), [150, 3, 77], num_kv_heads=2, group=2,
                     head_dim=16, block_size=8)
    for window in (None, 5, 40, 1000):
        out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                        case.block_tables, case.context_lens, case.scale,
                                        window=window)
        expected = dense_chunks(case, case.query, [1, 1, 1], window)
        assert relative_error(out, expected) < TOLERANCE["float32"]


def test_window_decode_never_reads_blocks_before_the_window():
    # Blocks wholly before the window may already be freed and reused: poison them.
    case = make_case(np.random.default_rng(8), [100], num_kv_heads=1, group=4, head_dim=16,
                     block_size=8)
    expected = dense_chunks(case, case.query, [1], 20)
    case.block_tables[0, :9] = -(2**31)  # positions 0..71 are out of a 20-token window at 99
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale, window=20)
    assert relative_error(out, expected) < TOLERANCE["float32"]


def test_prefill_of_a_long_chunk_splits_its_scores(monkeypatch):
    monkeypatch.setattr(reference, "SCORE_BYTES", 4 * 4 * 40)  # a few rows per pass
    rng = np.random.default_rng(9)
    case, query, query_lens, starts = prefill_case(rng, [90, 33], [1.0, 0.5], num_kv_heads=2,
                                                   group=2, head_dim=16, block_size=16)
    for window in (None, 17):
        out = reference.paged_prefill_attention(query, case.key_cache, case.value_cache,
                                                case.block_tables, starts, case.context_lens,
                                                case.scale, window=window)
        expected = dense_chunks(case, query, query_lens, window)
        assert relative_error(out, expected) < TOLERANCE["float32"]


def test_prefill_argument_errors_name_the_problem():
    rng = np.random.default_rng(10)
    case, query, _, starts = prefill_case(rng, [20, 5], [0.5, 1.0], num_kv_heads=1, group=2,
                                          head_dim=8, block_size=8)
    args = (case.key_cache, case.value_cache, case.block_tables)
    with pytest.raises(AttentionArgumentError, match="rise from 0"):
        reference.paged_prefill_attention(query, *args, starts[::-1].copy(),
                                          case.context_lens, 1.0)
    with pytest.raises(AttentionArgumentError, match="int32"):
        reference.paged_prefill_attention(query, *args, starts.astype(np.int64),
                                          case.context_lens, 1.0)
    with pytest.raises(AttentionArgumentError, match="more query rows than context"):
        reference.paged_prefill_attention(query, *args, starts, np.array([20, 4], np.int32),
                                          1.0)
    with pytest.raises(AttentionArgumentError, match="window"):
        reference.paged_prefill_attention(query, *args, starts, case.context_lens, 1.0,
                                          window=0)
    with pytest.raises(AttentionArgumentError, match="window"):
        reference.paged_attention(case.query, *args, case.context_lens, 1.0, window=0)


def test_a_block_id_outside_the_cache_is_refused_not_clipped():
    case = make_case(np.random.default_rng(11), [20], num_kv_heads=1, group=2, head_dim=8,
                     block_size=8)
    case.block_tables[0, 1] = case.key_cache.shape[0] + 5
    with pytest.raises(AttentionArgumentError, match="outside the cache"):
        reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                  case.block_tables, case.context_lens, case.scale)
    starts = np.array([0, 1], np.int32)
    with pytest.raises(AttentionArgumentError, match="outside the cache"):
        reference.paged_prefill_attention(case.query, case.key_cache, case.value_cache,
                                          case.block_tables, starts, case.context_lens,
                                          case.scale)
