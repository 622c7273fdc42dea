"""What a transformer forward asks of a device, behind one interface: :class:`ModelOps`.

Memory (allocate, upload, download), the fused element-wise kernels of ``model_ops.cu``,
GEMMs (cuBLAS), the paged-attention kernels and CUDA graphs. :class:`CudaModelOps` queues
everything on one stream of its own, so a decode step can be captured as one graph and
replayed. Arrays are PyCUDA GPUArrays; ``dtype`` is the activations' and KV cache's type
(float16, bfloat16 as uint16 bits, or float32); the residual stream and GEMM outputs are
float32, norm weights and biases float32, RoPE inverse frequencies float64.

The runner (``velod.engine.models.cuda_runner``) sees only this interface; its unit tests
drive it with a NumPy implementation of it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from velod.kernels.layout import DTYPE_NAMES, AttentionArgumentError

THREADS = 256  # kOpsThreads in model_ops.cu
MAX_TOPK = 64
MAX_QKV_HEAD_DIM = 256


class Graph(Protocol):
    def replay(self) -> None: ...

    def close(self) -> None: ...


class ModelOps(Protocol):
    """Device operations on one stream (see the module docstring); all asynchronous except
    ``upload`` (returns when the host array may be reused) and ``download``."""

    dtype: np.dtype

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    def upload(self, dst: Any, host: np.ndarray, offset: int = 0) -> None:
        """Copies ``host`` into ``dst`` starting at element ``offset`` of its flat view."""

    def download(self, src: Any) -> np.ndarray: ...

    def free_memory(self) -> int: ...

    def embed(self, hidden: Any, table: Any, tokens: Any, scale: float) -> None: ...

    def rms_norm(self, out: Any, x: Any, weight: Any, eps: float, *,
                 index: Any = None) -> None: ...

    def qkv(self, q: Any, k: Any, v: Any, qkv: Any, *, bias: Any, q_norm: Any, k_norm: Any,
            positions: Any, inv_freq: Any, rope_dims: int, neox: bool, eps: float) -> None: ...

    def residual(self, hidden: Any, x: Any, weight: Any, eps: float) -> None: ...

    def gate(self, out: Any, gate_up: Any, activation: str) -> None: ...

    def linear(self, out: Any, x: Any, weight: Any) -> None: ...

    def argmax(self, out: Any, logits: Any) -> None: ...

    def write_cache(self, key: Any, value: Any, key_cache: Any, value_cache: Any,
                    slots: Any) -> None: ...

    def decode_attention(self, out: Any, query: Any, key_cache: Any, value_cache: Any,
                         block_tables: Any, context_lens: Any, scale: float, *,
                         window: int | None, max_context: int, workspace: Any) -> None: ...

    def prefill_attention(self, out: Any, query: Any, key_cache: Any, value_cache: Any,
                          block_tables: Any, query_start_loc: Any, context_lens: Any,
                          scale: float, *, window: int | None, max_query_len: int) -> None: ...

    def decode_workspace_size(self, num_seqs: int, num_heads: int, head_dim: int,
                              num_kv_heads: int, max_context: int) -> int: ...

    def capture(self, record: Any) -> Graph: ...

    def synchronize(self) -> None: ...


class _InContext:
    """A graph whose replay and close make the device's context current first (the driver
    needs it, and a caller's thread may have none)."""

    def __init__(self, graph: Any, backend: Any) -> None:
        self._graph, self._backend = graph, backend

    def replay(self) -> None:
        with self._backend.active():
            self._graph.replay()

    def close(self) -> None:
        with self._backend.active():
            self._graph.close()


def _ptr(array: Any) -> int:
    return 0 if array is None else int(array.gpudata)


class CudaModelOps:
    """:class:`ModelOps` on a CUDA device: velod's kernels, cuBLAS and CUDA graphs."""

    def __init__(self, backend: Any, dtype: Any) -> None:
        import pycuda.driver as drv  # lazy: velod works without PyCUDA

        from velod.kernels.cublas import Cublas
        from velod.kernels.graphs import GraphCapture

        self.backend = backend
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPE_NAMES:
            raise AttentionArgumentError(f"no kernels for {self.dtype.name}")
        self._drv = drv
        self._option = f"-DVELOD_ONLY_{DTYPE_NAMES[self.dtype.name].upper()}"
        self._suffix = DTYPE_NAMES[self.dtype.name]
        with backend.active():
            self.stream = drv.Stream()
        self.blas = Cublas(lambda nbytes: backend.empty((nbytes,), np.uint8))
        self._graphs = GraphCapture()
        self._kernels: dict[str, Any] = {}

    # ---- memory ----------------------------------------------------------------------------

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.backend.empty(tuple(shape), dtype)

    def upload(self, dst: Any, host: np.ndarray, offset: int = 0) -> None:
        host = np.ascontiguousarray(host)
        if offset + host.size > dst.size or host.dtype.itemsize != dst.dtype.itemsize:
            raise AttentionArgumentError(
                f"cannot copy {host.size} {host.dtype.name} values into {dst.size} "
                f"{np.dtype(dst.dtype).name} at {offset}")
        with self.backend.active():
            if host.size:
                self._drv.memcpy_htod(_ptr(dst) + offset * host.dtype.itemsize, host)

    def download(self, src: Any) -> np.ndarray:
        with self.backend.active():
            return src.get()

    def free_memory(self) -> int:
        return self.backend.free_memory()

    def synchronize(self) -> None:
        with self.backend.active():
            self.stream.synchronize()

    def capture(self, record: Any) -> Graph:
        with self.backend.active():
            return _InContext(self._graphs.capture(self.stream, record), self.backend)

    # ---- kernels ---------------------------------------------------------------------------

    def _kernel(self, name: str, arg_types: list[Any]) -> Any:
        kernel = self._kernels.get(name)
        if kernel is None:
            from velod.kernels.cuda import MODEL_OPS_SOURCE

            kernel = self.backend.function(MODEL_OPS_SOURCE, name, (self._option,))
            kernel.prepare(arg_types)
            self._kernels[name] = kernel
        return kernel

    def _launch(self, name: str, arg_types: list[Any], grid: int, *args: Any) -> None:
        kernel = self._kernel(name, arg_types)
        with self.backend.active():
            kernel.prepared_async_call((grid, 1, 1), (THREADS, 1, 1), self.stream, *args)

    def embed(self, hidden, table, tokens, scale):
        rows, width = hidden.shape
        if rows:
            self._launch(f"velod_embed_{self._suffix}", [np.uintp] * 3 + [np.int32] * 2 +
                         [np.float32], rows, _ptr(hidden), _ptr(table), _ptr(tokens), width,
                         table.shape[0], np.float32(scale))

    def rms_norm(self, out, x, weight, eps, *, index=None):
        rows, n = out.shape
        if rows:
            self._launch(f"velod_rms_norm_{self._suffix}",
                         [np.uintp] * 4 + [np.int32, np.int64, np.float32], rows, _ptr(out),
                         _ptr(x), _ptr(weight), _ptr(index), n, x.shape[-1], np.float32(eps))

    def qkv(self, q, k, v, qkv, *, bias, q_norm, k_norm, positions, inv_freq, rope_dims, neox,
            eps):
        rows, heads, head_dim = q.shape
        if head_dim > MAX_QKV_HEAD_DIM:
            raise AttentionArgumentError(f"head_dim {head_dim} > {MAX_QKV_HEAD_DIM}")
        if rows:
            self._launch(f"velod_qkv_{self._suffix}", [np.uintp] * 9 + [np.int32] * 5 +
                         [np.float32], rows, _ptr(q), _ptr(k), _ptr(v), _ptr(qkv), _ptr(bias),
                         _ptr(q_norm), _ptr(k_norm), _ptr(positions), _ptr(inv_freq), heads,
                         k.shape[1], head_dim, rope_dims, int(neox), np.float32(eps))

    def residual(self, hidden, x, weight, eps):
        rows, n = hidden.shape
        if rows:
            self._launch("velod_residual", [np.uintp] * 3 + [np.int32, np.float32], rows,
                         _ptr(hidden), _ptr(x), _ptr(weight), n, np.float32(eps))

    def gate(self, out, gate_up, activation):
        rows, ffn = out.shape
        name = {"silu": "silu_gate", "gelu_tanh": "gelu_gate"}[activation]
        blocks = max(1, min(-(-rows * ffn // THREADS), 8 * self.backend.num_sms))
        if rows:
            self._launch(f"velod_{name}_{self._suffix}", [np.uintp] * 2 + [np.int64, np.int32],
                         blocks, _ptr(out), _ptr(gate_up), rows, ffn)

    def linear(self, out, x, weight):
        if out.shape[0]:
            with self.backend.active():
                self.blas.matmul(x, weight, out, transpose_b=True, stream=self.stream)

    def argmax(self, out, logits):
        rows, vocab = logits.shape
        if rows:
            self._launch("velod_argmax", [np.uintp] * 2 + [np.int32], rows, _ptr(out),
                         _ptr(logits), vocab)

    def topk(self, values, indices, logits, k: int) -> None:
        """Each row's ``k`` (<= 64) largest logits and their indices, descending."""
        rows, vocab = logits.shape
        if not 1 <= k <= min(MAX_TOPK, vocab):
            raise AttentionArgumentError(f"top-k needs 1 <= k <= {min(MAX_TOPK, vocab)}")
        if rows:
            self._launch("velod_topk", [np.uintp] * 3 + [np.int32] * 2, rows, _ptr(values),
                         _ptr(indices), _ptr(logits), vocab, k)

    # ---- attention -------------------------------------------------------------------------

    def write_cache(self, key, value, key_cache, value_cache, slots):
        self.backend.write_cache(key, value, key_cache, value_cache, slots, stream=self.stream)

    def decode_attention(self, out, query, key_cache, value_cache, block_tables, context_lens,
                         scale, *, window, max_context, workspace):
        if query.shape[0]:
            self.backend.paged_attention(query, key_cache, value_cache, block_tables,
                                         context_lens, scale, out=out, stream=self.stream,
                                         max_context=max_context, window=window,
                                         workspace=workspace)

    def prefill_attention(self, out, query, key_cache, value_cache, block_tables,
                          query_start_loc, context_lens, scale, *, window, max_query_len):
        if query.shape[0]:
            self.backend.paged_prefill_attention(query, key_cache, value_cache, block_tables,
                                                 query_start_loc, context_lens, scale,
                                                 window=window, out=out, stream=self.stream,
                                                 max_query_len=max_query_len)

    def decode_workspace_size(self, num_seqs, num_heads, head_dim, num_kv_heads, max_context):
        """float32 elements a decode call of this shape needs for its partitions."""
        from velod.kernels.layout import AttentionShape, plan_attention_launch

        shape = AttentionShape(num_seqs, num_heads, num_kv_heads, head_dim, 1, 16, 1)
        plan = plan_attention_launch(shape, self.dtype.itemsize, max_context,
                                     self.backend.num_sms, tensor_cores=self.backend.tensor_cores)
        return num_seqs * num_heads * plan.max_parts * (head_dim + 2)
