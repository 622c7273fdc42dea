"""The synthetic model's q/k/v made on the GPU, so the host never builds or uploads them.

The numbers are the ones ``velod.engine.runtime.synthetic.synthetic_vectors`` makes on the
host (a counter-based hash of token, position, layer and element); the kernel is
``synthetic_qkv.cu``, compiled through the backend's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CUDA_SOURCE = Path(__file__).parent / "synthetic_qkv.cu"

_DTYPE_CODES = {"float32": 0, "float16": 1, "uint16": 2}


def cuda_source() -> str:
    """The CUDA C of the device generator (compile-checked by the tests with nvcc)."""
    return CUDA_SOURCE.read_text()


class DeviceGenerator:
    """q/k/v of one step's tokens, per layer, in device buffers reused step after step."""

    def __init__(self, backend: Any, heads: int, kv_heads: int, head_dim: int,
                 dtype: np.dtype) -> None:
        import pycuda.gpuarray as gpuarray

        self.backend = backend
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self._gpuarray = gpuarray
        # Compiled and cached by velod (not pycuda's SourceModule, whose cache under
        # $XDG_CACHE_HOME/pycuda is read-only inside velod's systemd sandbox).
        self._kernel = backend.function(CUDA_SOURCE, "velod_synthetic_qkv")
        self._kernel.prepare([np.uintp] * 5 + [np.int32] * 3 + [np.uint32] * 3
                             + [np.float32, np.int32])
        self._buffers: dict[str, Any] = {}
        self._count = 0
        self._tokens = self._positions = None
        self._views: tuple[Any, Any, Any] = ()
        self._grid = backend.num_sms * 8

    def _buffer(self, name: str, count: int, width: int) -> Any:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < count:
            buffer = self._gpuarray.empty((max(count, 256), width), self.dtype)
            self._buffers[name] = buffer
        return buffer

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray) -> None:
        count = len(token_ids)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        with self.backend.active():
            self._tokens = self.backend.stage("synthetic.tokens",
                                              np.ascontiguousarray(token_ids, np.int32))
            self._positions = self.backend.stage("synthetic.positions",
                                                 np.ascontiguousarray(positions, np.int32))
            q = self._buffer("q", count, q_width)
            k = self._buffer("k", count, kv_width)
            v = self._buffer("v", count, kv_width)
            # The step's views, made once: every layer overwrites the same rows.
            self._views = (q[:count].reshape((count, self.heads, self.head_dim)),
                           k[:count].reshape((count, self.kv_heads, self.head_dim)),
                           v[:count].reshape((count, self.kv_heads, self.head_dim)))
        self._count = count

    def close(self) -> None:
        """Frees the device buffers now (inside the context: any thread may call it)."""
        with self.backend.active():
            self._buffers.clear()
            self._views = ()
            self._tokens = self._positions = None

    def layer_qkv(self, salts: tuple[int, ...], query_gain: float) -> tuple[Any, Any, Any]:
        """Launches the generator for one layer (its q, k, v ``salts``), asynchronously, and
        returns the q, k, v views.

        The views are the same buffers for every layer of a step: a layer's q/k/v must be
        consumed (by launches queued after this one) before the next layer is asked for.
        """
        q, k, v = self._views
        if self._count:
            with self.backend.active():
                self._kernel.prepared_async_call(
                    (self._grid, 1, 1), (256, 1, 1), None, int(q.gpudata), int(k.gpudata),
                    int(v.gpudata), int(self._tokens.gpudata), int(self._positions.gpudata),
                    self._count, self.heads * self.head_dim, self.kv_heads * self.head_dim,
                    *salts, np.float32(query_gain), _DTYPE_CODES[self.dtype.name])
        return q, k, v
