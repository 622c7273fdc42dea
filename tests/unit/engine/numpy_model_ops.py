"""``ModelOps`` (velod.kernels.model_ops) in NumPy, shaped like the CUDA one, for the runner's
unit tests where PyCUDA cannot run.

"Device" arrays are NumPy arrays, allocated poisoned (0xFF bytes: NaN) so a read of anything
never written shows up. The arithmetic is the NumPy forward's own (``velod.engine.models.ops``
and ``velod.kernels.reference``), rounded to the arrays' types as the kernels round. As on a
CUDA stream under capture, operations queued while a graph is being captured are recorded,
not run, and run on every ``replay()`` against whatever the buffers then hold; host
transfers during a capture are errors (CUDA forbids pageable copies there). Memory is
counted against a capacity, so loading can be checked against a budget.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

import velod.engine.models.ops as numpy_ops
from velod.kernels import reference
from velod.kernels.layout import from_float32, to_float32


class NumpyGraph:
    def __init__(self, owner: NumpyModelOps, steps: list[tuple[str, Callable[[], None]]]) -> None:
        self.owner, self.steps, self.closed = owner, steps, False

    def replay(self) -> None:
        assert not self.closed, "replay of a closed graph"
        self.owner.replays += 1
        for name, run in self.steps:
            self.owner.ran[name] += 1
            run()

    def close(self) -> None:
        self.closed = True


class NumpyModelOps:
    """The NumPy stand-in for CudaModelOps (see module docstring)."""

    def __init__(self, dtype, capacity: int = 8 << 30) -> None:
        self.dtype = np.dtype(dtype)
        self.capacity, self.allocated = capacity, 0
        self.ran: Counter[str] = Counter()           # operations executed, by name
        self.attention_rows: list[tuple[str, int]] = []
        self.captures = self.replays = 0
        self._recording: list[tuple[str, Callable[[], None]]] | None = None

    def _queue(self, name: str, run: Callable[[], None]) -> None:
        if self._recording is not None:
            self._recording.append((name, run))
        else:
            self.ran[name] += 1
            run()

    # ---- memory ----------------------------------------------------------------------------

    def empty(self, shape, dtype) -> np.ndarray:
        array = np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, 0xFF,
                        np.uint8).view(dtype).reshape(shape)
        self.allocated += array.nbytes
        if self.allocated > self.capacity:
            raise MemoryError("out of device memory")
        return array

    def upload(self, dst, host, offset=0):
        assert self._recording is None, "a host-to-device copy inside a graph capture"
        host = np.ascontiguousarray(host)
        assert host.dtype.itemsize == dst.dtype.itemsize and offset + host.size <= dst.size
        dst.reshape(-1)[offset:offset + host.size] = host.reshape(-1).view(dst.dtype)

    def download(self, src):
        assert self._recording is None, "a device-to-host copy inside a graph capture"
        return np.array(src, copy=True)

    def free_memory(self) -> int:
        return self.capacity - self.allocated

    def synchronize(self) -> None:
        return None

    def capture(self, record):
        self._recording = []
        try:
            record()
            steps = self._recording
        finally:
            self._recording = None
        self.captures += 1
        return NumpyGraph(self, steps)

    # ---- the forward's operations ------------------------------------------------------------

    def embed(self, hidden, table, tokens, scale):
        def run():
            ids = tokens.astype(np.int64)
            valid = (ids >= 0) & (ids < table.shape[0])
            hidden[...] = to_float32(table)[np.where(valid, ids, 0)] * np.float32(scale)
            hidden[~valid] = 0.0
        self._queue("embed", run)

    def rms_norm(self, out, x, weight, eps, *, index=None):
        def run():
            rows = x if index is None else x[index.astype(np.int64)]
            out[...] = from_float32(numpy_ops.rms_norm(rows, weight, eps), out.dtype)
        self._queue("rms_norm", run)

    def qkv(self, q, k, v, qkv, *, bias, q_norm, k_norm, positions, inv_freq, rope_dims, neox,
            eps):
        def run():
            rows = qkv + bias if bias is not None else qkv.copy()
            count, heads, dim = q.shape
            kv = k.shape[1]
            qs = rows[:, :heads * dim].reshape(count, heads, dim)
            ks = rows[:, heads * dim:(heads + kv) * dim].reshape(count, kv, dim)
            vs = rows[:, (heads + kv) * dim:].reshape(count, kv, dim)
            if q_norm is not None:
                qs, ks = numpy_ops.rms_norm(qs, q_norm, eps), numpy_ops.rms_norm(ks, k_norm, eps)
            assert len(inv_freq) == rope_dims // 2
            cos, sin = numpy_ops.rope_tables(positions, inv_freq)
            numpy_ops.apply_rope(qs, cos, sin, "neox" if neox else "norm")
            numpy_ops.apply_rope(ks, cos, sin, "neox" if neox else "norm")
            q[...], k[...], v[...] = (from_float32(a, q.dtype) for a in (qs, ks, vs))
        self._queue("qkv", run)

    def residual(self, hidden, x, weight, eps):
        def run():
            hidden[...] += numpy_ops.rms_norm(x, weight, eps) if weight is not None else x
        self._queue("residual", run)

    def gate(self, out, gate_up, activation):
        def run():
            out[...] = from_float32(numpy_ops.ACTIVATIONS[activation](gate_up), out.dtype)
        self._queue("gate", run)

    def linear(self, out, x, weight):
        def run():
            out[...] = from_float32(to_float32(x) @ to_float32(weight).T, out.dtype)
        self._queue("linear", run)

    def argmax(self, out, logits):
        def run():
            out[...] = logits.argmax(axis=-1)
        self._queue("argmax", run)

    def write_cache(self, key, value, key_cache, value_cache, slots):
        self._queue("write_cache", lambda: reference.write_cache(key, value, key_cache,
                                                                 value_cache, slots))

    def decode_attention(self, out, query, key_cache, value_cache, block_tables, context_lens,
                         scale, *, window, max_context, workspace):
        # A captured launch keeps its scratch pointer: the backend's own buffer may move.
        assert self._recording is None or workspace is not None, "capture without workspace"
        self.attention_rows.append(("decode", query.shape[0]))

        def run():
            assert context_lens.max() <= max_context, "grid sized for a shorter context"
            out[...] = reference.paged_attention(query, key_cache, value_cache, block_tables,
                                                 context_lens, scale, window=window)
        self._queue("decode_attention", run)

    def prefill_attention(self, out, query, key_cache, value_cache, block_tables,
                          query_start_loc, context_lens, scale, *, window, max_query_len):
        self.attention_rows.append(("prefill", query.shape[0]))

        def run():
            assert np.diff(query_start_loc).max() <= max_query_len, "grid too small"
            out[...] = reference.paged_prefill_attention(query, key_cache, value_cache,
                                                         block_tables, query_start_loc,
                                                         context_lens, scale, window=window)
        self._queue("prefill_attention", run)

    def decode_workspace_size(self, num_seqs, num_heads, head_dim, num_kv_heads, max_context):
        return num_seqs * num_heads * (head_dim + 2) * -(-max_context // 512)
