"""GEMMs on the GPU through cuBLAS, called with ctypes: no binding package to install or carry.

velod's arrays are row-major; cuBLAS is column-major. A row-major ``[rows, cols]`` matrix is,
to cuBLAS, its own transpose with leading dimension ``cols``, so ``C = A · op(B)`` is computed
as ``Cᵀ = op(B)ᵀ · Aᵀ``: swap the operands, keep each one's transposition, and hand cuBLAS
``m = N``, ``n = M`` (:func:`row_major_gemm`). Weights are stored ``[out, in]`` (GGUF's order),
so a linear layer is ``x · Wᵀ`` (``transpose_b=True``).

Inputs are fp16, bf16 or fp32; accumulation is fp32 (``CUBLAS_COMPUTE_32F``); C is fp32 or
the inputs' type. cuBLAS runs in the CUDA runtime's primary context of the device, the same one
PyCUDA's backend retains, so device pointers from either are valid for the other. One handle
per stream (a handle is not safe to share between threads that launch at the same time), each
with its own workspace, which a CUDA graph capture needs (no allocation inside a capture).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# cudaDataType_t (library_types.h), cublasComputeType_t, cublasOperation_t, cublasGemmAlgo_t
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT = -1
DATA_TYPES = {"float32": CUDA_R_32F, "float16": CUDA_R_16F, "uint16": CUDA_R_16BF}  # uint16: bf16
STATUS_NAMES = {0: "SUCCESS", 1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE",
                8: "ARCH_MISMATCH", 11: "MAPPING_ERROR", 13: "EXECUTION_FAILED",
                14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}
WORKSPACE_BYTES = 32 * 2**20  # cuBLAS's recommendation for Hopper

_H = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_longlong
_SIGNATURES: dict[str, list[Any]] = {
    "cublasCreate_v2": [ctypes.POINTER(_H)],
    "cublasDestroy_v2": [_H],
    "cublasSetStream_v2": [_H, _H],
    "cublasSetWorkspace_v2": [_H, _H, ctypes.c_size_t],
    "cublasGemmEx": [_H, _I, _I, _I, _I, _I, _H, _H, _I, _I, _H, _I, _I, _H, _H, _I, _I, _I, _I],
    "cublasGemmStridedBatchedEx": [_H, _I, _I, _I, _I, _I, _H, _H, _I, _I, _I64, _H, _I, _I,
                                   _I64, _H, _H, _I, _I, _I64, _I, _I, _I],
}


class CublasError(RuntimeError):
    """cuBLAS is missing, or refused or failed a call (the message names which and why)."""


def library_candidates() -> list[str]:
    """Where libcublas may be: the toolkit under $CUDA_HOME (or CUDA_PATH, /usr/local/cuda),
    NVIDIA's pip wheel (``nvidia/cublas/lib``), then the loader's own search by soname,
    newest first."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")]
    folders = [Path(root, lib) for root in [r for r in roots if r] + ["/usr/local/cuda"]
               for lib in ("lib64", "lib", "targets/x86_64-linux/lib")]
    try:
        wheel = importlib.util.find_spec("nvidia.cublas")
    except (ImportError, ValueError):
        wheel = None
    if wheel is not None and wheel.submodule_search_locations:
        folders += [Path(p, "lib") for p in wheel.submodule_search_locations]
    found = [str(p) for folder in folders
             for p in sorted(folder.glob("libcublas.so*"), reverse=True)]
    found += ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"]
    name = ctypes.util.find_library("cublas")
    return found + ([name] if name else [])


def load_library(loader: Callable[[str], Any] = ctypes.CDLL) -> Any:
    """libcublas with the signatures velod calls declared; CublasError naming every place
    tried when none loads."""
    errors = []
    for candidate in library_candidates():
        try:
            lib = loader(candidate)
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
            continue
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        return lib
    raise CublasError("libcublas not found (install the CUDA toolkit's cuBLAS or set "
                      f"CUDA_HOME); tried: {'; '.join(errors[:6])}")


@dataclass(frozen=True)
class GemmArgs:
    """A row-major GEMM as cuBLAS's column-major arguments (first operand = velod's B)."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int


def row_major_gemm(rows: int, cols: int, inner: int, *, transpose_b: bool) -> GemmArgs:
    """cuBLAS arguments for row-major ``C[rows, cols] = A[rows, inner] · op(B)``, where B is
    ``[cols, inner]`` (``transpose_b``) or ``[inner, cols]``: computed as ``Cᵀ = op(B)ᵀ·Aᵀ``."""
    if transpose_b:  # B is [cols, inner]: to cuBLAS a [inner, cols] matrix, transposed back
        return GemmArgs(CUBLAS_OP_T, CUBLAS_OP_N, cols, rows, inner, inner, inner, cols)
    return GemmArgs(CUBLAS_OP_N, CUBLAS_OP_N, cols, rows, inner, cols, inner, cols)


def _data_type(array: Any) -> int:
    name = np.dtype(array.dtype).name
    if name not in DATA_TYPES:
        raise CublasError(f"cuBLAS GEMMs take float32, float16 or bfloat16 (uint16) arrays, "
                          f"got {name}")
    return DATA_TYPES[name]


def _check_status(status: int, call: str) -> None:
    if status != 0:
        raise CublasError(f"{call} failed: CUBLAS_STATUS_{STATUS_NAMES.get(status, status)}")


def _stream_handle(stream: Any) -> int:
    """The CUstream of a PyCUDA stream (0 for None: the legacy default stream)."""
    return 0 if stream is None else int(getattr(stream, "handle", stream))


class Cublas:
    """cuBLAS handles (one per stream) and row-major GEMM calls on device arrays.

    Arrays are any objects with ``shape``, ``dtype`` and ``gpudata`` (a device pointer, as
    PyCUDA's GPUArray); ``allocate(nbytes)`` returns such a buffer for a handle's workspace.
    Calls are asynchronous on their stream, like kernel launches.
    """

    def __init__(self, allocate: Callable[[int], Any], lib: Any = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
        self._lib = lib if lib is not None else load_library()
        self._allocate = allocate
        self._workspace_bytes = workspace_bytes
        self._handles: dict[int, tuple[ctypes.c_void_p, Any]] = {}
        self._lock = threading.Lock()

    def handle(self, stream: Any = None) -> ctypes.c_void_p:
        """The handle bound to ``stream``, created (in the current context) on first use."""
        key = _stream_handle(stream)
        with self._lock:
            found = self._handles.get(key)
            if found is not None:
                return found[0]
            handle = ctypes.c_void_p()
            _check_status(self._lib.cublasCreate_v2(ctypes.pointer(handle)), "cublasCreate")
            try:
                _check_status(self._lib.cublasSetStream_v2(handle, key), "cublasSetStream")
                workspace = self._allocate(self._workspace_bytes)
                _check_status(self._lib.cublasSetWorkspace_v2(
                    handle, int(workspace.gpudata), self._workspace_bytes), "cublasSetWorkspace")
            except BaseException:
                self._lib.cublasDestroy_v2(handle)
                raise
            self._handles[key] = (handle, workspace)
            return handle

    def close(self) -> None:
        """Destroys every handle (in the current context) and drops their workspaces."""
        with self._lock:
            for handle, _workspace in self._handles.values():
                self._lib.cublasDestroy_v2(handle)
            self._handles.clear()

    def matmul(self, a: Any, b: Any, c: Any, *, transpose_b: bool = True, alpha: float = 1.0,
               beta: float = 0.0, stream: Any = None) -> Any:
        """``c[M, N] = alpha · a[M, K] · op(b) + beta · c`` (row-major, fp32 accumulation);
        ``op(b) = bᵀ`` for ``b`` stored ``[N, K]`` (a weight ``[out, in]``). Returns ``c``."""
        rows, inner, cols = self._shapes(a, b, c, transpose_b, batched=False)
        g = row_major_gemm(rows, cols, inner, transpose_b=transpose_b)
        types = self._types(a, b, c)
        scalars = ctypes.c_float(alpha), ctypes.c_float(beta)  # read by cuBLAS during the call
        status = self._lib.cublasGemmEx(
            self.handle(stream), g.transa, g.transb, g.m, g.n, g.k,
            ctypes.addressof(scalars[0]), int(b.gpudata), types[0], g.lda, int(a.gpudata),
            types[1], g.ldb, ctypes.addressof(scalars[1]), int(c.gpudata), types[2], g.ldc,
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        _check_status(status, f"cublasGemmEx {rows}x{inner} by {cols}")
        return c

    def matmul_batched(self, a: Any, b: Any, c: Any, *, transpose_b: bool = True,
                       alpha: float = 1.0, beta: float = 0.0, stream: Any = None) -> Any:
        """``c[i] = alpha · a[i] · op(b[i]) + beta · c[i]`` over the leading axis of 3-D
        row-major arrays (one strided-batched call). Returns ``c``."""
        batch, rows, inner, cols = self._shapes(a, b, c, transpose_b, batched=True)
        g = row_major_gemm(rows, cols, inner, transpose_b=transpose_b)
        types = self._types(a, b, c)
        scalars = ctypes.c_float(alpha), ctypes.c_float(beta)
        status = self._lib.cublasGemmStridedBatchedEx(
            self.handle(stream), g.transa, g.transb, g.m, g.n, g.k,
            ctypes.addressof(scalars[0]), int(b.gpudata), types[0], g.lda, cols * inner,
            int(a.gpudata), types[1], g.ldb, rows * inner, ctypes.addressof(scalars[1]),
            int(c.gpudata), types[2], g.ldc, rows * cols, batch, CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT)
        _check_status(status, f"cublasGemmStridedBatchedEx {batch} x {rows}x{inner} by {cols}")
        return c

    @staticmethod
    def _types(a: Any, b: Any, c: Any) -> tuple[int, int, int]:
        """cuBLAS's types of its operands (velod's b, a, c), or CublasError."""
        types = (_data_type(b), _data_type(a), _data_type(c))
        if types[0] != types[1] or types[2] not in (types[0], CUDA_R_32F):
            raise CublasError("a and b must share one type, and c be float32 or that type")
        return types

    @staticmethod
    def _shapes(a: Any, b: Any, c: Any, transpose_b: bool, *, batched: bool) -> tuple[int, ...]:
        """(batch,) rows, inner, cols of a valid call, or CublasError naming the mismatch."""
        dims = 3 if batched else 2
        for name, x in (("a", a), ("b", b), ("c", c)):
            if len(x.shape) != dims:
                raise CublasError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
        *batch_a, rows, inner = (int(n) for n in a.shape)
        *batch_b, b0, b1 = (int(n) for n in b.shape)
        cols, b_inner = (b0, b1) if transpose_b else (b1, b0)
        if b_inner != inner or tuple(c.shape) != (*batch_a, rows, cols) or batch_a != batch_b:
            raise CublasError(
                f"shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)} "
                f"({'transposed' if transpose_b else 'as is'}), c {tuple(c.shape)}")
        if max(rows, cols, inner, *batch_a) >= 2**31:
            raise CublasError("a GEMM dimension exceeds cuBLAS's 32-bit int")
        return (*batch_a, rows, inner, cols)
