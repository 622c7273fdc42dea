"""CUDA paged prefill attention and windowed decode attention against the NumPy path, on a device.

Grid: dtype x head_dim x block_size (every prefill instantiation), each call packing a one-row
chunk, a whole short prompt, a chunk at the end of a longer context and a long chunk, with the
GQA ratio and the sliding window cycling over the grid. Blocks before a window are poisoned
and their table entries made invalid (as after the engine freed them). Unused slots hold NaN
and the output starts as NaN. Tolerances as in the decode GPU tests (float32 summation order;
fp16/bf16 one rounding of the output, twice for bf16's P).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu.test_paged_attention_gpu import GPU_TOLERANCE, STORE
from tests.unit.kernels.attention_cases import make_case
from tests.unit.kernels.test_kernel_emulation import forget_blocks_before_windows as forget_decode
from tests.unit.kernels.test_prefill_emulation import forget_blocks_before_windows
from velod.kernels import reference
from velod.kernels.layout import (
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    from_float32,
    to_float32,
)

GROUPS = [1, 4, 8, 2]
WINDOWS = [None, 200, None, 33]
LENGTHS = [1, 17, 300, 1030]
QUERY_ROWS = [1, 17, 64, 513]


def poisoned(backend, shape, dtype):
    return backend.to_device(from_float32(np.full(shape, np.nan, np.float32), dtype))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    got = to_float32(got).astype(np.float64)
    expected = to_float32(expected).astype(np.float64)
    assert not np.isnan(got).any(), "NaN in the CUDA output: stray read or unwritten element"
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def prefill_case(seed: int, dtype: str, group: int, head_dim: int, block_size: int):
    rng = np.random.default_rng(seed)
    case = make_case(rng, LENGTHS, num_kv_heads=2, group=group, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, keep_dense=False)
    starts = np.concatenate([[0], np.cumsum(QUERY_ROWS)]).astype(np.int32)
    query = from_float32(rng.standard_normal((int(starts[-1]), 2 * group, head_dim),
                                             dtype=np.float32), STORE[dtype])
    return case, query, starts


GRID = [(dtype, d, b) for dtype in STORE for d in SUPPORTED_HEAD_DIMS
        for b in SUPPORTED_BLOCK_SIZES]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "head_dim", "block_size"), GRID,
                         ids=[f"{t}-d{d}-b{b}" for t, d, b in GRID])
def test_cuda_prefill_matches_numpy_over_the_grid(cuda_backend, dtype, head_dim, block_size):
    index = GRID.index((dtype, head_dim, block_size))
    window = WINDOWS[index % len(WINDOWS)]
    case, query, starts = prefill_case(index, dtype, GROUPS[index % len(GROUPS)], head_dim,
                                       block_size)
    expected = reference.paged_prefill_attention(query, case.key_cache, case.value_cache,
                                                 case.block_tables, starts, case.context_lens,
                                                 case.scale, window=window)
    if window is not None:
        forget_blocks_before_windows(case, QUERY_ROWS, window)
    b = cuda_backend
    out = poisoned(b, query.shape, STORE[dtype])
    result = b.paged_prefill_attention(
        b.to_device(query), b.to_device(case.key_cache), b.to_device(case.value_cache),
        b.to_device(case.block_tables), starts, case.context_lens, case.scale, window=window,
        out=out)
    assert result is out
    b.synchronize()
    assert relative_error(b.to_host(out), expected) < 2 * GPU_TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(STORE))
def test_device_resident_indices_with_a_given_longest_chunk_give_the_same_rows(cuda_backend,
                                                                             dtype):
    case, query, starts = prefill_case(77, dtype, 4, 128, 16)
    b = cuda_backend
    host = b.to_host(b.paged_prefill_attention(
        b.to_device(query), b.to_device(case.key_cache), b.to_device(case.value_cache),
        b.to_device(case.block_tables), starts, case.context_lens, case.scale))
    device = b.to_host(b.paged_prefill_attention(
        b.to_device(query), b.to_device(case.key_cache), b.to_device(case.value_cache),
        b.to_device(case.block_tables), b.to_device(starts), b.to_device(case.context_lens),
        case.scale, max_query_len=max(QUERY_ROWS)))
    assert np.array_equal(host, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(STORE))
@pytest.mark.parametrize("window", [1, 100, 4096])
def test_cuda_decode_with_a_sliding_window_matches_numpy(cuda_backend, dtype, window):
    case = make_case(np.random.default_rng(window), [1, 50, 600, 5000, 9000], num_kv_heads=2,
                     group=4, head_dim=128, block_size=16, dtype=dtype, keep_dense=False)
    expected = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                         case.block_tables, case.context_lens, case.scale,
                                         window=window)
    forget_decode(case, window)
    b = cuda_backend
    out = poisoned(b, case.query.shape, STORE[dtype])
    b.paged_attention(b.to_device(case.query), b.to_device(case.key_cache),
                      b.to_device(case.value_cache), b.to_device(case.block_tables),
                      case.context_lens, case.scale, window=window, out=out)
    b.synchronize()
    assert relative_error(b.to_host(out), expected) < 2 * GPU_TOLERANCE[dtype]


@pytest.mark.gpu
def test_decode_with_a_caller_workspace_equals_the_backend_s_own(cuda_backend):
    case = make_case(np.random.default_rng(5), [3000, 7000], num_kv_heads=2, group=4,
                     head_dim=128, block_size=16, dtype="float16", keep_dense=False)
    b = cuda_backend
    args = (b.to_device(case.query), b.to_device(case.key_cache), b.to_device(case.value_cache),
            b.to_device(case.block_tables))
    own = b.to_host(b.paged_attention(*args, case.context_lens, case.scale,
                                      partition_size=512))
    workspace = b.empty((b.attention_workspace_size(2, 8, 128, 14),), np.float32)
    given = b.to_host(b.paged_attention(*args, case.context_lens, case.scale,
                                        partition_size=512, workspace=workspace))
    assert np.array_equal(own, given)
