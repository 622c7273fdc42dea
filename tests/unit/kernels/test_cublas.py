"""velod's ctypes cuBLAS module against a libcublas stand-in that follows cuBLAS's documented
column-major semantics and computes on a fake device memory (tests/fakes/cublas.py).

What this shows without a GPU: the row-major arrays velod passes come out as the right
product (so the transposition trick, the leading dimensions and the operand order are right),
types and scalars reach cuBLAS as documented, one handle per stream with its workspace, and
errors are clear. What it cannot show (the GPU check runs it): that the real library accepts
the calls and is fast.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tests.fakes.cublas import FakeCublas, FakeDeviceMemory
from velod.kernels.cublas import (
    CUBLAS_OP_N,
    CUBLAS_OP_T,
    Cublas,
    CublasError,
    load_library,
    row_major_gemm,
)
from velod.kernels.layout import bf16_bits, to_float32

STORE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


@pytest.fixture
def gpu():
    memory = FakeDeviceMemory()
    lib = FakeCublas(memory)
    return memory, lib, Cublas(memory.allocate, lib=lib, workspace_bytes=4096)


def random(rng, shape, dtype):
    x = rng.standard_normal(shape, dtype=np.float32)
    return bf16_bits(x) if dtype == "bfloat16" else x.astype(STORE[dtype])


@pytest.mark.parametrize("dtype", sorted(STORE))
def test_linear_is_x_times_the_weight_transposed_in_row_major(gpu, dtype):
    memory, lib, blas = gpu
    rng = np.random.default_rng(0)
    x, weight = random(rng, (3, 5), dtype), random(rng, (7, 5), dtype)  # weight [out, in]
    out = memory.empty((3, 7), np.float32)
    blas.matmul(memory.to_device(x), memory.to_device(weight), out)
    expected = to_float32(x).astype(np.float64) @ to_float32(weight).astype(np.float64).T
    assert np.allclose(out.view(), expected, rtol=1e-6, atol=1e-6)
    name, args = lib.calls[-1]
    assert name == "cublasGemmEx" and args[:2] == (CUBLAS_OP_T, CUBLAS_OP_N)


def test_matmul_with_b_as_is_and_an_output_of_the_input_type(gpu):
    memory, _lib, blas = gpu
    rng = np.random.default_rng(1)
    a, b = random(rng, (4, 6), "float16"), random(rng, (6, 9), "float16")
    out = memory.empty((4, 9), np.float16)
    blas.matmul(memory.to_device(a), memory.to_device(b), out, transpose_b=False)
    expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    assert np.array_equal(out.view(), expected.astype(np.float16))


def test_alpha_and_beta_scale_and_accumulate_into_c(gpu):
    memory, _lib, blas = gpu
    rng = np.random.default_rng(2)
    a, w = random(rng, (2, 3), "float32"), random(rng, (4, 3), "float32")
    start = rng.standard_normal((2, 4), dtype=np.float32)
    out = memory.to_device(start)
    blas.matmul(memory.to_device(a), memory.to_device(w), out, alpha=0.5, beta=2.0)
    assert np.allclose(out.view(), 0.5 * a @ w.T + 2.0 * start, rtol=1e-6)


@pytest.mark.parametrize("transpose_b", [True, False])
def test_batched_matmul_multiplies_each_pair(gpu, transpose_b):
    memory, lib, blas = gpu
    rng = np.random.default_rng(3)
    a = random(rng, (5, 3, 8), "bfloat16")
    b = random(rng, (5, 6, 8) if transpose_b else (5, 8, 6), "bfloat16")
    out = memory.empty((5, 3, 6), np.float32)
    blas.matmul_batched(memory.to_device(a), memory.to_device(b), out, transpose_b=transpose_b)
    fa, fb = to_float32(a).astype(np.float64), to_float32(b).astype(np.float64)
    expected = fa @ (fb.transpose(0, 2, 1) if transpose_b else fb)
    assert np.allclose(out.view(), expected, rtol=1e-6, atol=1e-6)
    assert lib.calls[-1][0] == "cublasGemmStridedBatchedEx" and lib.calls[-1][1][-1] == 5


def test_row_major_arguments_are_the_column_major_transpose():
    # C[2, 3] = A[2, 4] · W[3, 4]ᵀ  <=>  Cᵀ[3, 2] = W · Aᵀ: m = 3, n = 2, k = 4
    g = row_major_gemm(2, 3, 4, transpose_b=True)
    assert (g.transa, g.transb, g.m, g.n, g.k, g.lda, g.ldb, g.ldc) == (1, 0, 3, 2, 4, 4, 4, 3)
    g = row_major_gemm(2, 3, 4, transpose_b=False)
    assert (g.transa, g.transb, g.m, g.n, g.k, g.lda, g.ldb, g.ldc) == (0, 0, 3, 2, 4, 3, 4, 3)


def test_one_handle_per_stream_each_bound_to_it_with_its_own_workspace(gpu):
    memory, lib, blas = gpu
    a, w = memory.to_device(np.ones((1, 2), np.float32)), memory.to_device(np.ones((2, 2),
                                                                                   np.float32))
    out = memory.empty((1, 2), np.float32)

    class Stream:
        def __init__(self, handle: int) -> None:
            self.handle = handle

    first, second = Stream(0xAA), Stream(0xBB)
    for stream in (first, second, first, None):
        blas.matmul(a, w, out, stream=stream)
    assert [c[0] for c in lib.calls].count("cublasCreate_v2") == 3
    streams = {h["stream"] for h in lib.handles.values()}
    assert streams == {0xAA, 0xBB, 0}
    workspaces = [h["workspace"] for h in lib.handles.values()]
    assert len({w[0] for w in workspaces}) == 3 and all(w[1] == 4096 for w in workspaces)
    blas.close()
    assert lib.handles == {}


def test_a_status_from_cublas_is_an_error_naming_it(gpu):
    memory, lib, blas = gpu
    lib.fail_with = 13
    with pytest.raises(CublasError, match="EXECUTION_FAILED"):
        blas.matmul(memory.empty((2, 2), np.float16), memory.empty((2, 2), np.float16),
                    memory.empty((2, 2), np.float32))


@pytest.mark.parametrize(("a", "b", "c", "message"), [
    ((2, 3), (4, 5), (2, 4), "do not chain"),
    ((2, 3), (4, 3), (4, 2), "do not chain"),
    ((2, 3, 1), (4, 3), (2, 4), "must be 2-D"),
])
def test_shapes_that_do_not_chain_are_refused_before_cublas_is_called(gpu, a, b, c, message):
    memory, lib, blas = gpu
    with pytest.raises(CublasError, match=message):
        blas.matmul(memory.empty(a, np.float16), memory.empty(b, np.float16),
                    memory.empty(c, np.float32))
    assert not [call for call in lib.calls if call[0].startswith("cublasGemm")]


def test_mixed_input_types_are_refused(gpu):
    memory, _lib, blas = gpu
    with pytest.raises(CublasError, match="share one type"):
        blas.matmul(memory.empty((2, 2), np.float16), memory.empty((2, 2), np.uint16),
                    memory.empty((2, 2), np.float32))
    with pytest.raises(CublasError, match="float32, float16 or bfloat16"):
        blas.matmul(memory.empty((2, 2), np.int8), memory.empty((2, 2), np.int8),
                    memory.empty((2, 2), np.float32))


def test_load_library_declares_every_signature_it_calls():
    lib = load_library(loader=lambda path: FakeCublas(FakeDeviceMemory(1024)))
    assert lib.cublasGemmEx.argtypes[6] is ctypes.c_void_p  # alpha: a host pointer
    assert lib.cublasGemmStridedBatchedEx.argtypes[10] is ctypes.c_longlong  # strideA
    assert lib.cublasCreate_v2.restype is ctypes.c_int


def test_a_missing_library_names_the_places_tried():
    def missing(path: str):
        raise OSError(f"{path}: cannot open shared object file")

    with pytest.raises(CublasError, match=r"libcublas not found.*libcublas\.so\.13"):
        load_library(loader=missing)
