"""The NumPy paged-attention path against naive dense attention, and the cache operations."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import astuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.kernels.attention_cases import (
    DTYPES,
    TOLERANCE,
    dense_attention,
    make_case,
    relative_error,
)
from velod.kernels import (
    AttentionArgumentError,
    BackendUnavailable,
    NumpyBackend,
    cuda_unavailable_reason,
    get_backend,
    reference,
)
from velod.kernels.layout import (
    bf16_bits,
    bf16_to_float32,
    choose_partition_size,
    from_float32,
    kernel_geometry,
)

shapes = st.fixed_dictionaries({
    "lengths": st.lists(st.integers(1, 150), min_size=1, max_size=4),
    "num_kv_heads": st.sampled_from([1, 2, 4]),
    "group": st.sampled_from([1, 2, 3, 4, 8]),
    "head_dim": st.sampled_from([8, 16, 64, 80]),
    "block_size": st.sampled_from([1, 8, 16, 32]),
    "dtype": st.sampled_from(sorted(DTYPES)),
    "seed": st.integers(0, 2**32 - 1),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_paged_attention_matches_dense_attention(shape):
    case = make_case(np.random.default_rng(shape.pop("seed")), **shape)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale)
    assert out.dtype == case.query.dtype
    assert out.shape == case.query.shape
    assert relative_error(out, dense_attention(case)) < TOLERANCE[shape["dtype"]]


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from([1, 2, 16, 24, 64]))
def test_partitioned_path_matches_dense_attention(shape, partition_size):
    case = make_case(np.random.default_rng(shape.pop("seed")), **shape)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale,
                                    partition_size=partition_size)
    assert relative_error(out, dense_attention(case)) < TOLERANCE[shape["dtype"]]


@pytest.mark.parametrize("partition_size", [16, 64, 512])
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_lengths_at_partition_boundaries(partition_size, offset):
    length = partition_size + offset
    lengths = [length, 2 * partition_size + offset, 1]
    case = make_case(np.random.default_rng(length), lengths, num_kv_heads=2, group=4,
                     head_dim=64, block_size=16)
    expected = dense_attention(case)
    for size in (partition_size, None):
        out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                        case.block_tables, case.context_lens, case.scale,
                                        partition_size=size)
        assert relative_error(out, expected) < TOLERANCE["float32"]


def test_length_one_returns_the_value_row():
    case = make_case(np.random.default_rng(1), [1], num_kv_heads=2, group=2, head_dim=16,
                     block_size=16)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale)
    expected = np.repeat(case.dense_values[0][0], 2, axis=0)  # each kv head serves 2 q heads
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_empty_context_gives_zeros():
    case = make_case(np.random.default_rng(2), [5, 0], num_kv_heads=1, group=2, head_dim=8,
                     block_size=8)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale)
    assert np.array_equal(out[1], np.zeros_like(out[1]))
    assert relative_error(out, dense_attention(case)) < TOLERANCE["float32"]


def test_mqa_with_many_query_heads():
    case = make_case(np.random.default_rng(3), [33, 200], num_kv_heads=1, group=32,
                     head_dim=128, block_size=32)
    out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.context_lens, case.scale)
    assert relative_error(out, dense_attention(case)) < TOLERANCE["float32"]


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    if a.dtype == np.uint16:
        assert np.array_equal(a, b)
    else:
        assert np.array_equal(a, b, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from([8, 16, 32]), st.sampled_from(sorted(DTYPES)),
       st.sampled_from([np.int32, np.int64]), st.integers(0, 2**32 - 1))
def test_write_cache_stores_rows_exactly_where_slots_say(num_tokens, block_size, dtype,
                                                          index_type, seed):
    rng = np.random.default_rng(seed)
    store = DTYPES[dtype]
    num_blocks, kv, dim = 6, 2, 16
    nan = from_float32(np.full((), np.nan, np.float32), store)
    key_cache = np.full((num_blocks, block_size, kv, dim), nan, dtype=store)
    value_cache = key_cache.copy()
    slots = rng.choice(num_blocks * block_size, size=num_tokens, replace=False)
    slots[rng.random(num_tokens) < 0.2] = -1  # padding tokens
    key = from_float32(rng.standard_normal((num_tokens, kv, dim)).astype(np.float32), store)
    value = from_float32(rng.standard_normal((num_tokens, kv, dim)).astype(np.float32), store)
    expected_k, expected_v = key_cache.copy(), value_cache.copy()
    for token, slot in enumerate(slots):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[token]
            expected_v[slot // block_size, slot % block_size] = value[token]
    reference.write_cache(key, value, key_cache, value_cache, slots.astype(index_type))
    assert_same(key_cache, expected_k)
    assert_same(value_cache, expected_v)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5), st.sampled_from([np.int32, np.int64]), st.integers(0, 2**32 - 1))
def test_copy_blocks_copies_whole_blocks_and_nothing_else(num_pairs, index_type, seed):
    rng = np.random.default_rng(seed)
    num_blocks = 12
    key_cache = rng.standard_normal((num_blocks, 8, 2, 16)).astype(np.float16)
    key_cache[rng.random(key_cache.shape) < 0.1] = np.nan
    value_cache = rng.standard_normal(key_cache.shape).astype(np.float16)
    chosen = rng.choice(num_blocks, size=2 * num_pairs, replace=False)
    pairs = chosen.reshape(num_pairs, 2).astype(index_type)
    expected_k, expected_v = key_cache.copy(), value_cache.copy()
    for source, destination in pairs:
        expected_k[destination] = key_cache[source]
        expected_v[destination] = value_cache[source]
    reference.copy_blocks(key_cache, value_cache, pairs)
    assert_same(key_cache, expected_k)
    assert_same(value_cache, expected_v)


def test_argument_errors_name_the_problem():
    case = make_case(np.random.default_rng(4), [20], num_kv_heads=2, group=2, head_dim=16,
                     block_size=8)
    args = (case.key_cache, case.value_cache, case.block_tables)
    with pytest.raises(AttentionArgumentError, match="multiple of num_kv_heads"):
        reference.paged_attention(case.query[:, :3], *args, case.context_lens, 1.0)
    with pytest.raises(AttentionArgumentError, match="head_dim"):
        reference.paged_attention(case.query[..., :8], *args, case.context_lens, 1.0)
    with pytest.raises(AttentionArgumentError, match=r"needs .* blocks"):
        too_long = np.array([8 * case.block_tables.shape[1] + 1], np.int32)
        reference.paged_attention(case.query, *args, too_long, 1.0)
    with pytest.raises(AttentionArgumentError, match="int32"):
        reference.paged_attention(case.query, *args, case.context_lens.astype(np.int64), 1.0)
    with pytest.raises(AttentionArgumentError, match="share one dtype"):
        reference.paged_attention(case.query.astype(np.float16), *args, case.context_lens, 1.0)
    key = np.zeros((2, 2, 16), np.float32)
    with pytest.raises(AttentionArgumentError, match="twice"):
        reference.write_cache(key, key, case.key_cache, case.value_cache,
                              np.array([3, 3], np.int64))
    with pytest.raises(AttentionArgumentError, match="past the cache"):
        reference.write_cache(key, key, case.key_cache, case.value_cache,
                              np.array([0, 10**6], np.int64))
    with pytest.raises(AttentionArgumentError, match="both a source and a destination"):
        reference.copy_blocks(case.key_cache, case.value_cache, np.array([[0, 1], [1, 2]]))


def test_bf16_bits_round_to_nearest_even_and_back():
    values = np.array([1.0, -2.5, 1.00390625, 1.01171875, np.inf], np.float32)
    back = bf16_to_float32(bf16_bits(values))
    np.testing.assert_array_equal(back, [1.0, -2.5, 1.0, 1.015625, np.inf])
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (down); 1 + 3·2^-8 goes up.
    assert np.isnan(bf16_to_float32(bf16_bits(np.array([np.nan], np.float32))))[0]


def test_kernel_geometry_of_common_shapes():
    # fp16, head_dim 128: 16 lanes x 16 bytes per row, 8 groups, 32-token tiles, 2 x 16 KiB.
    assert astuple(kernel_geometry(2, 128)) == (16, 8, 32, 32768)
    assert astuple(kernel_geometry(2, 80)) == (16, 8, 32, 20480)    # 10 of 16 lanes load
    assert astuple(kernel_geometry(4, 256)) == (32, 4, 8, 32768)    # 2 vectors per lane
    assert astuple(kernel_geometry(2, 64)) == (8, 16, 64, 32768)


def test_partition_size_single_pass_when_short_and_batch_is_large():
    assert choose_partition_size(300, blocks_per_partition=512, num_sms=132) == 300
    assert choose_partition_size(8192, blocks_per_partition=512, num_sms=132) == 512
    # Small batches split further so that every multiprocessor gets work.
    assert choose_partition_size(2048, blocks_per_partition=8, num_sms=132) == 64
    # Very long contexts keep at most 64 partitions per sequence.
    assert choose_partition_size(131072, blocks_per_partition=512, num_sms=132) == 2048


def test_backend_front_uses_numpy_without_cuda():
    assert get_backend("cpu").name == "numpy"
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA is usable here; the fallback is not exercised")
    assert isinstance(get_backend("auto"), NumpyBackend)
    with pytest.raises(BackendUnavailable):
        get_backend("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        get_backend("tpu")


def test_numpy_backend_writes_into_out():
    case = make_case(np.random.default_rng(5), [9, 3], num_kv_heads=1, group=2, head_dim=8,
                     block_size=8)
    backend = get_backend("cpu")
    out = backend.empty(case.query.shape, case.query.dtype)
    result = backend.paged_attention(case.query, case.key_cache, case.value_cache,
                                     case.block_tables, case.context_lens, case.scale, out=out)
    assert result is out
    assert relative_error(out, dense_attention(case)) < TOLERANCE["float32"]


def test_importing_kernels_does_not_import_pycuda():
    code = "import sys, velod.kernels; print('pycuda' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_launch_plan_serves_each_kv_head_once_or_in_head_chunks():
    from velod.kernels.layout import AttentionShape, plan_attention_launch

    gqa = AttentionShape(num_seqs=64, num_heads=32, num_kv_heads=8, head_dim=128,
                         num_blocks=1, block_size=16, max_blocks_per_seq=512)
    plan = plan_attention_launch(gqa, itemsize=2, max_context=8192, num_sms=132)
    assert plan.heads_per_block == 4                      # the whole group in one block
    assert plan.grid == (16, 8, 64)                        # 512-token partitions
    assert plan.smem_bytes == 32768
    mqa = AttentionShape(2, 32, 1, 256, 1, 16, 8)
    plan = plan_attention_launch(mqa, itemsize=4, max_context=100, num_sms=132,
                                 partition_size=4096)
    assert plan.heads_per_block == 4 and plan.grid == (1, 8, 2)  # 8 chunks of 4 heads
    with pytest.raises(AttentionArgumentError, match="partition_size"):
        plan_attention_launch(gqa, 2, 8192, 132, partition_size=0)
