"""CUDA paged attention, cache writes and block copies against the NumPy path, on a device.

Grid: dtype x head_dim x block_size (every instantiation), each call holding sequences of
1, 15, 16, 17, 511, 4096 and 32768 tokens, plus 131072 at block size 16 (every dtype and
head_dim; it dominates the NumPy time), with the GQA ratio cycling over the grid;
plus every GQA ratio at one shape, and lengths at partition boundaries (forced and automatic).
Unused slots and blocks hold NaN and the output starts as NaN, so a stray read or a missing
write fails. Tolerance is ‖cuda − numpy‖ / ‖numpy‖ per dtype: float32 1e-5 (summation order
only), float16 2e-3 and bfloat16 1.6e-2 (one rounding of the output, as in the CPU tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.kernels.attention_cases import TOLERANCE, make_case
from velod.kernels import reference
from velod.kernels.layout import (
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    choose_partition_size,
    from_float32,
    kernel_geometry,
    to_float32,
)

GPU_TOLERANCE = {**TOLERANCE, "float32": 1e-5}
LENGTHS = [1, 15, 16, 17, 511, 4096, 32768, 131072]
GQA_RATIOS = [1, 4, 8, 2]
STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def run_cuda(backend, case, partition_size=None) -> np.ndarray:
    """The CUDA output for a case, into an output buffer poisoned with NaN."""
    poison = from_float32(np.full(case.query.shape, np.nan, np.float32), case.query.dtype)
    out = backend.to_device(poison)
    result = backend.paged_attention(
        backend.to_device(case.query), backend.to_device(case.key_cache),
        backend.to_device(case.value_cache), backend.to_device(case.block_tables),
        case.context_lens, case.scale, partition_size=partition_size, out=out)
    assert result is out
    backend.synchronize()
    return backend.to_host(out)


def check_against_numpy(cuda_out: np.ndarray, case, dtype: str) -> float:
    expected = to_float32(reference.paged_attention(
        case.query, case.key_cache, case.value_cache, case.block_tables, case.context_lens,
        case.scale)).astype(np.float64)
    got = to_float32(cuda_out).astype(np.float64)
    assert not np.isnan(got).any(), "NaN in the CUDA output: stray read or unwritten element"
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    assert error < GPU_TOLERANCE[dtype], f"relative error {error:.2e}"
    return error


GRID = [(dtype, d, b) for dtype in STORE for d in SUPPORTED_HEAD_DIMS
        for b in SUPPORTED_BLOCK_SIZES]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "head_dim", "block_size"), GRID,
                         ids=[f"{t}-d{d}-b{b}" for t, d, b in GRID])
def test_cuda_matches_numpy_over_the_grid(cuda_backend, dtype, head_dim, block_size):
    index = GRID.index((dtype, head_dim, block_size))
    group = GQA_RATIOS[index % len(GQA_RATIOS)]
    rng = np.random.default_rng(index)
    lengths = LENGTHS if block_size == 16 else LENGTHS[:-1]
    case = make_case(rng, lengths, num_kv_heads=2, group=group, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, keep_dense=False)
    check_against_numpy(run_cuda(cuda_backend, case), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8, 12, 16, 32])
def test_cuda_matches_numpy_for_every_gqa_ratio(cuda_backend, group):
    case = make_case(np.random.default_rng(100 + group), [1, 17, 600, 5000], num_kv_heads=2,
                     group=group, head_dim=128, block_size=16, dtype="float16",
                     keep_dense=False)
    check_against_numpy(run_cuda(cuda_backend, case), case, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("partition_size", [64, 512, 2048])
def test_lengths_at_forced_partition_boundaries(cuda_backend, partition_size):
    lengths = [partition_size + delta for delta in (-1, 0, 1)]
    lengths += [3 * partition_size + delta for delta in (-1, 0, 1)]
    for dtype in STORE:
        case = make_case(np.random.default_rng(partition_size), lengths, num_kv_heads=2,
                         group=4, head_dim=128, block_size=16, dtype=dtype, keep_dense=False)
        check_against_numpy(run_cuda(cuda_backend, case, partition_size), case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 64])
def test_lengths_at_automatic_partition_boundaries(cuda_backend, num_seqs):
    geometry = kernel_geometry(2, 128)
    heads_per_block = min(4, geometry.groups)
    size = choose_partition_size(8192, num_seqs * 2 * (4 // heads_per_block),
                                 cuda_backend.num_sms)
    base = [size - 1, size, size + 1, 8192]
    lengths = (base * (num_seqs // len(base) + 1))[:max(num_seqs, len(base))]
    case = make_case(np.random.default_rng(num_seqs), lengths, num_kv_heads=2, group=4,
                     head_dim=128, block_size=16, dtype="float16", keep_dense=False)
    check_against_numpy(run_cuda(cuda_backend, case), case, "float16")


@pytest.mark.gpu
def test_empty_context_gives_zeros(cuda_backend):
    case = make_case(np.random.default_rng(9), [0, 40], num_kv_heads=1, group=4, head_dim=64,
                     block_size=8, dtype="float32", keep_dense=False)
    out = run_cuda(cuda_backend, case)
    assert np.array_equal(out[0], np.zeros_like(out[0]))
    check_against_numpy(out, case, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(STORE))
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_write_cache_and_copy_blocks_match_numpy_exactly(cuda_backend, dtype, index_type):
    rng = np.random.default_rng(11)
    store = STORE[dtype]
    nan = from_float32(np.full((), np.nan, np.float32), store)
    shape = (32, 16, 4, 128)
    key_cache = np.full(shape, nan, store)
    value_cache = np.full(shape, nan, store)
    tokens = 300
    slots = rng.choice(32 * 16, size=tokens, replace=False).astype(index_type)
    slots[rng.random(tokens) < 0.1] = -1
    key = from_float32(rng.standard_normal((tokens, 4, 128)).astype(np.float32), store)
    value = from_float32(rng.standard_normal((tokens, 4, 128)).astype(np.float32), store)
    dev_k, dev_v = cuda_backend.to_device(key_cache), cuda_backend.to_device(value_cache)
    cuda_backend.write_cache(cuda_backend.to_device(key), cuda_backend.to_device(value),
                             dev_k, dev_v, slots)
    reference.write_cache(key, value, key_cache, value_cache, slots)
    pairs = rng.choice(32, size=12, replace=False).reshape(6, 2).astype(index_type)
    cuda_backend.copy_blocks(dev_k, dev_v, pairs)
    reference.copy_blocks(key_cache, value_cache, pairs)
    cuda_backend.synchronize()
    for got, expected in ((cuda_backend.to_host(dev_k), key_cache),
                          (cuda_backend.to_host(dev_v), value_cache)):
        assert got.tobytes() == expected.tobytes()  # bit-exact, NaN slots included
