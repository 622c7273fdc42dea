"""A stand-in for libcublas at the ctypes boundary, over a fake device memory, for machines
without a GPU.

``FakeCublas`` has the functions velod declares (``cublasCreate_v2``, ``cublasGemmEx``, ...)
and follows cuBLAS's documented semantics: column-major matrices, element ``(i, j)`` of a
matrix at ``ptr + (i + j * ld) * itemsize``; ``C = alpha · op(A) · op(B) + beta · C`` with A of
``m x k`` (``k x m`` when transposed), B of ``k x n`` (``n x k``), C of ``m x n``;
``CUBLAS_STATUS_INVALID_VALUE`` (7) for negative sizes or a leading dimension below the rows
of the stored matrix; host pointers for alpha and beta (float32 for the fp32 compute type).
It computes the product with NumPy in float64 on the memory the pointers name, so a caller
that gets the column-major translation wrong gets a wrong matrix, not a silent pass. Every call
is recorded.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from velod.kernels.layout import from_float32, to_float32

STATUS_SUCCESS, STATUS_NOT_INITIALIZED, STATUS_INVALID_VALUE = 0, 1, 7
STATUS_MAPPING_ERROR, STATUS_NOT_SUPPORTED = 11, 15
TYPES = {0: np.float32, 2: np.float16, 14: np.uint16}  # CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
COMPUTE_32F = 68


class FakeDeviceMemory:
    """A flat byte buffer standing for device memory; pointers are ``base + offset``."""

    base = 0x7F00_0000_0000

    def __init__(self, size: int = 1 << 22) -> None:
        self.bytes = np.zeros(size, np.uint8)
        self.used = 0

    def allocate(self, nbytes: int) -> FakeDeviceArray:
        return self.empty((nbytes,), np.uint8)

    def empty(self, shape: tuple[int, ...], dtype) -> FakeDeviceArray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        start = -(-self.used // 256) * 256  # cudaMalloc alignment
        if start + nbytes > self.bytes.size:
            raise MemoryError("fake device memory exhausted")
        self.used = start + nbytes
        return FakeDeviceArray(tuple(shape), np.dtype(dtype), self.base + start, self)

    def to_device(self, array: np.ndarray) -> FakeDeviceArray:
        device = self.empty(array.shape, array.dtype)
        device.view()[...] = array
        return device

    def matrix(self, pointer: int, dtype, rows: int, cols: int, ld: int) -> np.ndarray | None:
        """The column-major ``rows x cols`` matrix at ``pointer`` (a writable view), or None
        when any element would lie outside the memory."""
        itemsize = np.dtype(dtype).itemsize
        offset = pointer - self.base
        if rows == 0 or cols == 0:
            return np.zeros((rows, cols), dtype)
        last = offset + ((rows - 1) + (cols - 1) * ld) * itemsize + itemsize
        if offset < 0 or offset % itemsize or last > self.bytes.size:
            return None
        typed = self.bytes[offset:last].view(dtype)
        return np.lib.stride_tricks.as_strided(typed, shape=(rows, cols),
                                               strides=(itemsize, ld * itemsize))


@dataclass
class FakeDeviceArray:
    """What velod's cuBLAS module reads of a device array: shape, dtype, gpudata."""

    shape: tuple[int, ...]
    dtype: np.dtype
    gpudata: int
    memory: FakeDeviceMemory = field(repr=False)

    def view(self) -> np.ndarray:
        offset = self.gpudata - self.memory.base
        count = int(np.prod(self.shape))
        raw = self.memory.bytes[offset:offset + count * self.dtype.itemsize]
        return raw.view(self.dtype).reshape(self.shape)


class LibraryFunction:
    """A library function: callable, with the ``argtypes``/``restype`` ctypes assigns."""

    def __init__(self, body) -> None:
        self.body = body
        self.argtypes = None
        self.restype = None

    def __call__(self, *args):
        return self.body(*args)


class FakeCublas:
    """libcublas's GEMM entry points over a FakeDeviceMemory (see module docstring)."""

    def __init__(self, memory: FakeDeviceMemory) -> None:
        self.memory = memory
        self.calls: list[tuple[str, tuple]] = []
        self.handles: dict[int, dict] = {}
        self.fail_with: int | None = None  # force a status on the next GEMM
        self._next = 0x1000
        for name in ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2",
                     "cublasSetWorkspace_v2", "cublasGemmEx", "cublasGemmStridedBatchedEx"):
            setattr(self, name, LibraryFunction(getattr(self, "_" + name)))

    def _record(self, name: str, args: tuple) -> None:
        self.calls.append((name, args))

    def _cublasCreate_v2(self, handle_pointer) -> int:
        self._record("cublasCreate_v2", ())
        self._next += 0x10
        handle_pointer.contents.value = self._next
        self.handles[self._next] = {"stream": 0, "workspace": None}
        return STATUS_SUCCESS

    def _cublasDestroy_v2(self, handle) -> int:
        self._record("cublasDestroy_v2", (_value(handle),))
        return STATUS_SUCCESS if self.handles.pop(_value(handle), None) else STATUS_NOT_INITIALIZED

    def _cublasSetStream_v2(self, handle, stream) -> int:
        self._record("cublasSetStream_v2", (_value(handle), _value(stream)))
        if _value(handle) not in self.handles:
            return STATUS_NOT_INITIALIZED
        self.handles[_value(handle)]["stream"] = _value(stream)
        return STATUS_SUCCESS

    def _cublasSetWorkspace_v2(self, handle, pointer, size) -> int:
        self._record("cublasSetWorkspace_v2", (_value(handle), _value(pointer), size))
        if _value(handle) not in self.handles:
            return STATUS_NOT_INITIALIZED
        if self.memory.matrix(_value(pointer), np.uint8, size, 1, size) is None:
            return STATUS_INVALID_VALUE
        self.handles[_value(handle)]["workspace"] = (_value(pointer), size)
        return STATUS_SUCCESS

    def _cublasGemmEx(self, handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype,
                      ldb, beta, c, ctype, ldc, compute, algo) -> int:
        self._record("cublasGemmEx", (transa, transb, m, n, k, lda, ldb, ldc, atype, btype,
                                      ctype))
        return self._gemm(handle, transa, transb, m, n, k, alpha, [(a, 0)], atype, lda,
                          [(b, 0)], btype, ldb, beta, [(c, 0)], ctype, ldc, compute)

    def _cublasGemmStridedBatchedEx(self, handle, transa, transb, m, n, k, alpha, a, atype,
                                    lda, stride_a, b, btype, ldb, stride_b, beta, c, ctype, ldc,
                                    stride_c, batch, compute, algo) -> int:
        self._record("cublasGemmStridedBatchedEx",
                     (transa, transb, m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c,
                      batch))
        if batch < 0:
            return STATUS_INVALID_VALUE
        return self._gemm(handle, transa, transb, m, n, k, alpha,
                          [(a, i * stride_a) for i in range(batch)], atype, lda,
                          [(b, i * stride_b) for i in range(batch)], btype, ldb, beta,
                          [(c, i * stride_c) for i in range(batch)], ctype, ldc, compute)

    def _gemm(self, handle, transa, transb, m, n, k, alpha, a_list, atype, lda, b_list, btype,
              ldb, beta, c_list, ctype, ldc, compute) -> int:
        if self.fail_with is not None:
            status, self.fail_with = self.fail_with, None
            return status
        if _value(handle) not in self.handles:
            return STATUS_NOT_INITIALIZED
        if transa not in (0, 1) or transb not in (0, 1) or min(m, n, k) < 0:
            return STATUS_INVALID_VALUE
        a_rows, a_cols = (m, k) if transa == 0 else (k, m)
        b_rows, b_cols = (k, n) if transb == 0 else (n, k)
        if lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m):
            return STATUS_INVALID_VALUE
        if compute != COMPUTE_32F or atype != btype or atype not in TYPES or \
                ctype not in (atype, 0):
            return STATUS_NOT_SUPPORTED
        scale = ctypes.c_float.from_address(_value(alpha)).value
        shift = ctypes.c_float.from_address(_value(beta)).value
        for (a, da), (b, db), (c, dc) in zip(a_list, b_list, c_list, strict=True):
            isz_a, isz_c = np.dtype(TYPES[atype]).itemsize, np.dtype(TYPES[ctype]).itemsize
            ma = self.memory.matrix(_value(a) + da * isz_a, TYPES[atype], a_rows, a_cols, lda)
            mb = self.memory.matrix(_value(b) + db * isz_a, TYPES[btype], b_rows, b_cols, ldb)
            mc = self.memory.matrix(_value(c) + dc * isz_c, TYPES[ctype], m, n, ldc)
            if ma is None or mb is None or mc is None:
                return STATUS_MAPPING_ERROR  # the device would fault
            op_a = to_float32(ma).astype(np.float64)
            op_b = to_float32(mb).astype(np.float64)
            op_a = op_a if transa == 0 else op_a.T
            op_b = op_b if transb == 0 else op_b.T
            result = scale * (op_a @ op_b)
            if shift != 0.0:
                result += shift * to_float32(mc).astype(np.float64)
            mc[...] = from_float32(result.astype(np.float32), TYPES[ctype])
        return STATUS_SUCCESS


def _value(x) -> int:
    """An integer argument as ctypes would pass it (c_void_p, int or None)."""
    if isinstance(x, ctypes.c_void_p):
        return x.value or 0
    return int(x or 0)
