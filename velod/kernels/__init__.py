"""Paged-attention kernels behind one front: CUDA through PyCUDA when it can run, NumPy otherwise.

``get_backend("auto")`` returns a backend with the same calls either way::

    backend = get_backend()
    out = backend.paged_attention(query, key_cache, value_cache, block_tables, context_lens,
                                  scale)
    rows = backend.paged_prefill_attention(query_rows, key_cache, value_cache, block_tables,
                                           query_start_loc, context_lens, scale)
    backend.write_cache(key, value, key_cache, value_cache, slot_mapping)
    backend.copy_blocks(key_cache, value_cache, block_pairs)

Layouts are documented in ``velod.kernels.layout``. Importing this package never imports
PyCUDA; only building a CUDA backend does.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from velod.kernels import reference
from velod.kernels.layout import AttentionArgumentError

__all__ = [
    "AttentionArgumentError",
    "AttentionBackend",
    "BackendUnavailable",
    "HostClock",
    "KernelClock",
    "NumpyBackend",
    "cuda_unavailable_reason",
    "get_backend",
]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine."""


class KernelClock(Protocol):
    """Times the device work between ``start`` and ``stop`` marks; ``total`` sums a step's."""

    def start(self) -> Any: ...

    def stop(self, mark: Any) -> None: ...

    def total(self) -> float: ...


class AttentionBackend(Protocol):
    """What the engine calls; arrays are NumPy (numpy backend) or PyCUDA GPUArrays (cuda).

    ``on_device``: arrays live in accelerator memory (the host must stage data to them).
    ``active()`` makes the device current in the calling thread (launches and frees need
    it); ``free_memory()`` is where a KV pool would live: free device memory, or available
    host RAM; ``clock()`` times kernels for profiling; ``trim()`` frees reusable buffers.
    """

    name: str
    on_device: bool
    device_name: str | None

    def paged_attention(self, query: Any, key_cache: Any, value_cache: Any, block_tables: Any,
                        context_lens: Any, scale: float, *, partition_size: int | None = None,
                        out: Any = None, stream: Any = None, max_context: int | None = None,
                        window: int | None = None, workspace: Any = None) -> Any: ...

    def paged_prefill_attention(self, query: Any, key_cache: Any, value_cache: Any,
                                block_tables: Any, query_start_loc: Any, context_lens: Any,
                                scale: float, *, window: int | None = None, out: Any = None,
                                stream: Any = None, max_query_len: int | None = None) -> Any: ...

    def write_cache(self, key: Any, value: Any, key_cache: Any, value_cache: Any,
                    slot_mapping: Any, *, stream: Any = None) -> None: ...

    def copy_blocks(self, key_cache: Any, value_cache: Any, block_pairs: Any, *,
                    stream: Any = None) -> None: ...

    def to_device(self, array: np.ndarray) -> Any: ...

    def stage(self, name: str, array: np.ndarray) -> Any: ...

    def to_host(self, array: Any) -> np.ndarray: ...

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    def synchronize(self) -> None: ...

    def active(self) -> AbstractContextManager[Any]: ...

    def free_memory(self) -> int: ...

    def clock(self) -> KernelClock: ...

    def trim(self) -> None: ...


class HostClock:
    """A synchronous backend's kernel time: the wall time between the marks."""

    def __init__(self) -> None:
        self._seconds = 0.0

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, mark: float) -> None:
        self._seconds += time.perf_counter() - mark

    def total(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds


class NumpyBackend:
    """The NumPy path: host arrays, float32 math, results ready on return."""

    name = "numpy"
    on_device = False
    device_name = None

    def paged_attention(self, query, key_cache, value_cache, block_tables, context_lens, scale,
                        *, partition_size=None, out=None, stream=None, max_context=None,
                        window=None, workspace=None):
        result = reference.paged_attention(query, key_cache, value_cache, block_tables,
                                           context_lens, scale, partition_size=partition_size,
                                           window=window)
        return _into(out, result)

    def paged_prefill_attention(self, query, key_cache, value_cache, block_tables,
                                query_start_loc, context_lens, scale, *, window=None, out=None,
                                stream=None, max_query_len=None):
        result = reference.paged_prefill_attention(query, key_cache, value_cache, block_tables,
                                                   query_start_loc, context_lens, scale,
                                                   window=window)
        return _into(out, result)

    def write_cache(self, key, value, key_cache, value_cache, slot_mapping, *, stream=None):
        reference.write_cache(key, value, key_cache, value_cache, slot_mapping)

    def copy_blocks(self, key_cache, value_cache, block_pairs, *, stream=None):
        reference.copy_blocks(key_cache, value_cache, block_pairs)

    def to_device(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True, order="C")

    def stage(self, name: str, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def synchronize(self) -> None:
        return None

    def active(self) -> AbstractContextManager[None]:
        return nullcontext()

    def free_memory(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)

    def clock(self) -> HostClock:
        return HostClock()

    def trim(self) -> None:
        return None


def _into(out: np.ndarray | None, result: np.ndarray) -> np.ndarray:
    """``result``, or ``out`` holding it when the caller gave an output buffer."""
    if out is None:
        return result
    out[...] = result
    return out


def cuda_unavailable_reason(device: int = 0) -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    if importlib.util.find_spec("pycuda") is None:
        return "PyCUDA is not installed (pip install 'velod[cuda]')"
    from velod.kernels.cuda import find_nvcc

    try:
        import pycuda.driver as drv

        drv.init()
        count = drv.Device.count()
    except Exception as exc:  # driver missing, no device node, version mismatch
        return f"CUDA driver unavailable: {exc}"
    if count <= device:
        return f"no CUDA device {device} (found {count})"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    return None


_CUDA_BACKENDS: dict[int, Any] = {}
_CUDA_LOCK = threading.Lock()


def _cuda_backend(index: int, cache_dir: Path | None) -> Any:
    """The process's one CudaBackend for device ``index``.

    One per device, never dropped: every device array then belongs to one PyCUDA context
    object (the device's primary context), whichever thread frees it, and modules compile
    and load once.
    """
    with _CUDA_LOCK:
        backend = _CUDA_BACKENDS.get(index)
        if backend is None:
            from velod.kernels.cuda import CudaBackend

            backend = _CUDA_BACKENDS[index] = CudaBackend(index, cache_dir=cache_dir)
        return backend


def get_backend(device: str = "auto", *, cache_dir: Path | None = None) -> AttentionBackend:
    """A backend for ``device``: "auto" (CUDA if it can run, else NumPy), "cpu"/"numpy",
    "cuda" or "cuda:N". Raises BackendUnavailable when CUDA is asked for and cannot run.
    A CUDA backend is made once per device and process (``cache_dir`` applies to the first)."""
    if device in ("cpu", "numpy"):
        return NumpyBackend()
    if device == "auto":
        if cuda_unavailable_reason() is not None:
            return NumpyBackend()
        device = "cuda"
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.partition(":")[2] or 0)
        reason = cuda_unavailable_reason(index)
        if reason is not None:
            raise BackendUnavailable(reason)
        return _cuda_backend(index, cache_dir)
    raise ValueError(f"unknown device {device!r}: use auto, cpu, numpy, cuda or cuda:N")
