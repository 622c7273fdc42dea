"""The transformer forward of ``transformer.py`` on a GPU: fp16/bf16 weights on the device,
cuBLAS GEMMs, fused element-wise kernels, paged attention, CUDA graphs for decode steps.

Same arithmetic, step for step, as the NumPy model (``TransformerModel``): embedding (x
sqrt(hidden) for gemma3) -> per layer RMSNorm, fused QKV GEMM, bias + q/k head norms + RoPE,
cache write, attention, output GEMM, residual (after a post-norm for gemma3), RMSNorm, fused
gate/up GEMM, SwiGLU/GeGLU, down GEMM, residual -> final RMSNorm of the sampled rows ->
logits -> greedy argmax. The residual stream and GEMM outputs are float32; GEMM inputs, the KV
cache and attention are in the model's ``dtype`` (float16 or bfloat16; float32 works too).

A step comes as the scheduler's :class:`StepBatch` (decode rows first, then prompt chunks):
``run_batch`` stages all its index arrays with one upload, sends decode rows to the decode
kernel and prompt chunks to the prefill kernel, and returns the sampled tokens. A decode-only
step of up to ``graph_batch_sizes[-1]`` sequences replays a CUDA graph captured once per
batch-size bucket (padding rows write no cache slot and attend nothing), so its host cost is
one upload, one graph launch and one download. All device work goes through ``ModelOps``
(``velod.kernels.model_ops``), so the runner has no CUDA of its own and its bookkeeping is
unit-tested with a NumPy implementation of that interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velod.engine.core.errors import EngineError
from velod.engine.core.step import StepBatch
from velod.engine.models.hparams import HParams, describe_model, open_model
from velod.engine.models.ops import rope_inverse_frequencies
from velod.engine.models.protocol import LayerAttention
from velod.engine.models.quants import dequantize
from velod.engine.models.weights import check_plan, plan
from velod.kernels.layout import from_float32
from velod.model.gguf import GGUFFile
from velod.units import format_size

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_CHUNK_BYTES = 64 * 2**20  # float32 rows dequantized on the host at a time
DEVICE_HEADROOM = 512 * 2**20  # left free after loading: activations, cuBLAS, the KV pool


class DeviceMemoryError(EngineError):
    """The weights would not fit in the device's free memory; the message gives the figures."""


@dataclass
class DeviceLayer:
    """One decoder layer's device arrays (None where the architecture has no such tensor)."""

    attn_norm: Any
    wqkv: Any
    wo: Any
    ffn_norm: Any
    wgu: Any
    wdown: Any
    bqkv: Any = None
    q_norm: Any = None
    k_norm: Any = None
    post_attn_norm: Any = None
    post_ffn_norm: Any = None


@dataclass
class DeviceWeights:
    """The model's device arrays: matrices in the compute type, vectors in float32."""

    embedding: Any
    output: Any
    output_norm: Any
    layers: list[DeviceLayer]
    rope_factors: np.ndarray | None = None       # host: folded into the inverse frequencies
    info: dict[str, Any] = field(default_factory=dict)


def device_weight_bytes(hp: HParams, tensor_names: frozenset[str], dtype: Any) -> int:
    """Bytes the weights take on the device: matrices in ``dtype``, vectors in float32."""
    itemsize = np.dtype(dtype).itemsize
    return sum(int(np.prod(s.shape)) * (itemsize if len(s.shape) == 2 else 4)
               for s in plan(hp, tensor_names) if s.key != "rope_factors")


def load_device_weights(gguf: GGUFFile, hp: HParams, ops: Any, dtype: Any) -> DeviceWeights:
    """Dequantizes every tensor on the host a chunk of rows at a time and uploads it, converted
    to ``dtype``, into its final device array (blocking: call from a thread).

    Nothing else is allocated on the device, so its peak use is the resident size; on the host
    one chunk (``LOAD_CHUNK_BYTES`` of float32) is live at a time. Refuses with
    DeviceMemoryError before allocating when the weights do not fit.
    """
    dtype = np.dtype(dtype)
    slots = plan(hp, frozenset(gguf.tensors))
    check_plan(gguf, slots)
    needed = device_weight_bytes(hp, frozenset(gguf.tensors), dtype)
    free_before = ops.free_memory()
    if needed + DEVICE_HEADROOM > free_before:
        raise DeviceMemoryError(
            f"{hp.name} needs {format_size(needed)} of {dtype.name} weights plus "
            f"{format_size(DEVICE_HEADROOM)} of headroom on the device, but only "
            f"{format_size(free_before)} is free; free device memory or use a smaller model")
    start = time.perf_counter()
    arrays: dict[str, Any] = {}
    lowest_free = free_before
    for slot in slots:
        if slot.key == "rope_factors":
            host = np.empty(slot.shape, np.float32)
            name = slot.sources[0][0]
            dequantize(gguf.tensors[name].data, gguf.tensors[name].ggml_type, host)
            arrays[slot.key] = host
            continue
        # cuBLAS takes either orientation at no cost: the output projection the CPU path
        # holds transposed stays in GGUF's [vocab, hidden] here (the embedding's own layout).
        key, shape = ("output", slot.sources[0][1]) if slot.transposed else (slot.key,
                                                                              slot.shape)
        matrix = len(shape) == 2
        device = ops.empty(shape, dtype if matrix else np.float32)
        row = 0
        for name, source_shape in slot.sources:
            _upload_tensor(gguf, name, source_shape, device, row, ops,
                           dtype if matrix else np.float32)
            row += source_shape[0]
        arrays[key] = device
        lowest_free = min(lowest_free, ops.free_memory())
    layers = [DeviceLayer(**{k.split(".", 1)[1]: v for k, v in arrays.items()
                             if k.startswith(f"{i}.")}) for i in range(hp.layers)]
    weights = DeviceWeights(embedding=arrays.get("embedding", arrays["output"]),
                            output=arrays["output"], output_norm=arrays["output_norm"],
                            layers=layers, rope_factors=arrays.get("rope_factors"))
    weights.info = {"dtype": dtype.name if dtype != np.uint16 else "bfloat16",
                    "bytes": needed, "device_peak_bytes": free_before - lowest_free,
                    "load_seconds": round(time.perf_counter() - start, 3),
                    "tied_output": hp.tied_output}
    return weights


def _upload_tensor(gguf: GGUFFile, name: str, shape: tuple[int, ...], device: Any, row: int,
                   ops: Any, dtype: np.dtype) -> None:
    """Tensor ``name`` into ``device`` from row ``row`` on, dequantized a chunk at a time
    (a tensor already stored in the device's type is copied as it is)."""
    info = gguf.tensors[name]
    rows = shape[0]
    width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    raw = info.data.reshape(-1).view(np.uint8)
    row_bytes = raw.size // rows
    target = np.dtype(dtype)
    as_is = _STORED_AS.get(info.ggml_type) == target
    step = max(1, LOAD_CHUNK_BYTES // (4 * width))
    for first in range(0, rows, step):
        last = min(first + step, rows)
        piece = raw[first * row_bytes:last * row_bytes]
        if as_is:
            chunk = piece.view(target)
        else:
            chunk = np.empty((last - first, *shape[1:]), np.float32)
            dequantize(piece, info.ggml_type, chunk)
            chunk = from_float32(chunk, target)
        ops.upload(device, chunk, (row + first) * width)
    gguf.release(info)


# GGML types whose bytes are already the device array's elements.
_STORED_AS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(np.uint16)}


@dataclass
class _Layout:
    """Where each index array of a step sits in the one int32 upload buffer."""

    tokens: int
    positions: int
    slots: int
    samples: int
    lens: int
    starts: int
    tables: int
    size: int

    @classmethod
    def of(cls, tokens: int, seqs: int, width: int) -> _Layout:
        offsets, at = [], 0
        for count in (tokens, tokens, tokens, seqs, seqs, seqs + 1, seqs * width):
            offsets.append(at)
            at += -(-count // 4) * 4  # 16-byte aligned views
        return cls(*offsets, at)


class CudaTransformer:
    """A loaded model on a device (see the module docstring).

    ``max_tokens`` rows per step and ``max_seqs`` sequences per step size the activation
    buffers, which are allocated once; ``max_blocks_per_seq`` x ``block_size`` tokens is the
    longest context a graph-replayed decode step handles.
    """

    def __init__(self, hp: HParams, weights: DeviceWeights, ops: Any, *, max_tokens: int,
                 max_seqs: int, block_size: int, max_blocks_per_seq: int,
                 graph_batch_sizes: Sequence[int] = GRAPH_BATCH_SIZES, source: str = "",
                 info: dict[str, Any] | None = None) -> None:
        self.hp, self.weights, self.ops = hp, weights, ops
        self.dtype = np.dtype(ops.dtype)
        self.name = hp.name
        self.kind = f"{hp.arch.name} language model (GGUF weights, on the GPU)"
        self.source, self.info = source, info or {}
        self.vocab_size = hp.vocab_size
        self.layers, self.heads, self.kv_heads = hp.layers, hp.heads, hp.kv_heads
        self.head_dim, self.context_length = hp.head_dim, hp.context_length
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.block_size, self.max_blocks_per_seq = block_size, max_blocks_per_seq
        self.graph_batch_sizes = tuple(sorted(b for b in graph_batch_sizes if b <= max_seqs))
        self._embed_scale = float(np.float32(np.sqrt(hp.hidden))) if hp.arch.embed_scale else 1.0
        self._inverse = {}
        for spec in hp.layer_specs:
            if spec.rope not in self._inverse:
                table = ops.empty((spec.rope.dims // 2,), np.float64)
                ops.upload(table, rope_inverse_frequencies(spec.rope, weights.rope_factors))
                self._inverse[spec.rope] = table
        self._buffers = self._allocate()
        self._graphs: dict[int, Any] = {}
        self._graph_key: tuple[int, ...] | None = None
        self._samples = 0
        self._views: dict[str, Any] = {}
        self._count = 0
        self.stats = {"graph_captures": 0, "graph_replays": 0, "eager_steps": 0}

    # ------------------------------------------------------------------ buffers

    def _allocate(self) -> dict[str, Any]:
        hp, ops, t, s = self.hp, self.ops, self.max_tokens, self.max_seqs
        layout = _Layout.of(t, s, self.max_blocks_per_seq)
        qkv_width = hp.q_width + 2 * hp.kv_width
        workspace = ops.decode_workspace_size(s, hp.heads, hp.head_dim, hp.kv_heads,
                                              self.max_blocks_per_seq * self.block_size)
        return {
            "index": ops.empty((layout.size,), np.int32),
            "hidden": ops.empty((t, hp.hidden), np.float32),
            "normed": ops.empty((t, hp.hidden), self.dtype),
            "qkv": ops.empty((t, qkv_width), np.float32),
            "q": ops.empty((t, hp.heads, hp.head_dim), self.dtype),
            "k": ops.empty((t, hp.kv_heads, hp.head_dim), self.dtype),
            "v": ops.empty((t, hp.kv_heads, hp.head_dim), self.dtype),
            "attn": ops.empty((t, hp.heads, hp.head_dim), self.dtype),
            "proj": ops.empty((t, hp.hidden), np.float32),
            "gate_up": ops.empty((t, 2 * hp.ffn), np.float32),
            "act": ops.empty((t, hp.ffn), self.dtype),
            "sample_normed": ops.empty((s, hp.hidden), self.dtype),
            "logits": ops.empty((s, hp.vocab_size), np.float32),
            "next": ops.empty((s,), np.int32),
            "rows": ops.empty((s,), np.int32),
            "workspace": ops.empty((max(workspace, 1),), np.float32),
        }

    def _index_views(self, layout: _Layout, tokens: int, seqs: int, samples: int,
                     width: int) -> dict[str, Any]:
        index = self._buffers["index"]
        return {"tokens": index[layout.tokens:layout.tokens + tokens],
                "positions": index[layout.positions:layout.positions + tokens],
                "slots": index[layout.slots:layout.slots + tokens],
                "samples": index[layout.samples:layout.samples + samples],
                "lens": index[layout.lens:layout.lens + seqs],
                "starts": index[layout.starts:layout.starts + seqs + 1],
                "tables": index[layout.tables:layout.tables + seqs * width].reshape(seqs, width)}

    def _stage(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
               samples: np.ndarray, lens: np.ndarray, starts: np.ndarray, tables: np.ndarray
               ) -> dict[str, Any]:
        """One upload of a step's index arrays; returns device views of each."""
        seqs, width = tables.shape
        if len(samples) > seqs or len(lens) != seqs or len(starts) != seqs + 1:
            raise EngineError(f"inconsistent step: {seqs} sequences, {len(lens)} lengths, "
                              f"{len(starts)} starts, {len(samples)} rows to sample")
        layout = _Layout.of(len(tokens), seqs, width)
        if layout.size > self._buffers["index"].size:
            raise EngineError(f"a step's block tables ({seqs} x {width}) exceed the runner's "
                              f"{self.max_blocks_per_seq} blocks per sequence")
        host = np.zeros(layout.size, np.int32)
        for name, values in (("tokens", tokens), ("positions", positions), ("slots", slots),
                             ("samples", samples), ("lens", lens), ("starts", starts),
                             ("tables", tables)):
            at = getattr(layout, name)
            host[at:at + values.size] = values.reshape(-1)
        self.ops.upload(self._buffers["index"], host)
        return self._index_views(layout, len(tokens), seqs, len(samples), width)

    # ------------------------------------------------------------------ one step

    def run_batch(self, batch: StepBatch, key_caches: Sequence[Any],
                  value_caches: Sequence[Any]) -> np.ndarray:
        """The greedy next token (int32) at each of ``batch.sample_indices``, after writing
        the step's K/V into the per-layer caches (blocking until the device is done)."""
        tokens, seqs, samples = batch.num_tokens, batch.num_seqs, len(batch.sample_indices)
        if tokens > self.max_tokens or seqs > self.max_seqs:
            raise EngineError(f"a step of {tokens} tokens in {seqs} sequences exceeds the "
                              f"runner's {self.max_tokens} tokens and {self.max_seqs} sequences")
        if tokens == 0:
            return np.zeros(0, np.int32)
        ids = batch.token_ids
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise EngineError(f"token id out of range [0, {self.vocab_size}) for {self.name}")
        bucket = self._bucket(batch)
        if bucket is not None:
            return self._replay(batch, bucket, key_caches, value_caches)
        self.stats["eager_steps"] += 1
        starts = batch.query_start_loc.astype(np.int32)
        nd = batch.num_decode
        # Prefill sequences' rows, counted from their first row (the kernel's query_start_loc)
        shifted = np.concatenate([np.zeros(nd, np.int32), starts[nd:] - starts[nd]])
        views = self._stage(ids, batch.positions, batch.slot_mapping, batch.sample_indices,
                            batch.context_lens, shifted, batch.block_tables)
        lens = batch.context_lens
        max_query = int(batch.query_lens[nd:].max()) if seqs > nd else 0
        self._forward(views, tokens, nd, seqs, samples, key_caches, value_caches,
                      max_context=int(lens[:nd].max()) if nd else 0, max_query=max_query)
        self._samples = samples
        return self.ops.download(self._buffers["next"][:samples])

    def last_logits(self) -> np.ndarray:
        """float32 ``[samples, vocab]`` of the last step's sampled rows."""
        return self.ops.download(self._buffers["logits"][:self._samples])

    def _forward(self, views: dict[str, Any], tokens: int, nd: int, seqs: int, samples: int,
                 key_caches: Sequence[Any], value_caches: Sequence[Any], *, max_context: int,
                 max_query: int, workspace: Any = None) -> None:
        """Queues one step's forward on the device (also what a graph captures)."""
        hp, ops, b = self.hp, self.ops, self._buffers
        q, k, v, attn = b["q"][:tokens], b["k"][:tokens], b["v"][:tokens], b["attn"][:tokens]
        ops.embed(b["hidden"][:tokens], self.weights.embedding, views["tokens"],
                  self._embed_scale)
        for i in range(hp.layers):
            spec = hp.layer_specs[i]
            self._attention_input(i, tokens, q, k, v, views["positions"])
            ops.write_cache(k, v, key_caches[i], value_caches[i], views["slots"])
            if nd:
                ops.decode_attention(attn[:nd], q[:nd], key_caches[i], value_caches[i],
                                     views["tables"][:nd], views["lens"][:nd], spec.scale,
                                     window=spec.window, max_context=max_context,
                                     workspace=workspace)
            if seqs > nd:
                ops.prefill_attention(attn[nd:], q[nd:], key_caches[i], value_caches[i],
                                      views["tables"][nd:], views["starts"][nd:],
                                      views["lens"][nd:], spec.scale, window=spec.window,
                                      max_query_len=max_query)
            self._attention_output(i, tokens, attn)
        self._logits(tokens, samples, views["samples"])
        ops.argmax(b["next"][:samples], b["logits"][:samples])

    def _attention_input(self, layer: int, tokens: int, q: Any, k: Any, v: Any,
                         positions: Any) -> None:
        """RMSNorm, the fused QKV GEMM, then bias, q/k norms and RoPE into q, k, v."""
        hp, ops, b = self.hp, self.ops, self._buffers
        w, spec = self.weights.layers[layer], hp.layer_specs[layer]
        normed, qkv = b["normed"][:tokens], b["qkv"][:tokens]
        ops.rms_norm(normed, b["hidden"][:tokens], w.attn_norm, hp.rms_eps)
        ops.linear(qkv, normed, w.wqkv)
        ops.qkv(q, k, v, qkv, bias=w.bqkv, q_norm=w.q_norm, k_norm=w.k_norm,
                positions=positions, inv_freq=self._inverse[spec.rope],
                rope_dims=spec.rope.dims, neox=spec.rope.style == "neox", eps=hp.rms_eps)

    def _attention_output(self, layer: int, tokens: int, attention: Any) -> None:
        """Output GEMM and residual, then the MLP and its residual (post-norms for gemma3)."""
        hp, ops, b = self.hp, self.ops, self._buffers
        w, eps = self.weights.layers[layer], hp.rms_eps
        hidden, normed, proj = b["hidden"][:tokens], b["normed"][:tokens], b["proj"][:tokens]
        ops.linear(proj, attention.reshape(tokens, hp.q_width), w.wo)
        ops.residual(hidden, proj, w.post_attn_norm, eps)
        ops.rms_norm(normed, hidden, w.ffn_norm, eps)
        ops.linear(b["gate_up"][:tokens], normed, w.wgu)
        ops.gate(b["act"][:tokens], b["gate_up"][:tokens], hp.arch.activation)
        ops.linear(proj, b["act"][:tokens], w.wdown)
        ops.residual(hidden, proj, w.post_ffn_norm, eps)

    def _logits(self, tokens: int, samples: int, rows: Any) -> None:
        """Final norm of the sampled ``rows`` of the hidden state, then the logits GEMM."""
        b = self._buffers
        normed = b["sample_normed"][:samples]
        self.ops.rms_norm(normed, b["hidden"][:tokens], self.weights.output_norm,
                          self.hp.rms_eps, index=rows)
        self.ops.linear(b["logits"][:samples], normed, self.weights.output)

    # ------------------------------------------------------------------ layer by layer
    # The LanguageModel protocol (velod.engine.models.protocol): the engine writes the cache
    # and runs attention itself between layer_qkv and layer_output. No graphs on this path.

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray,
                   sample_indices: np.ndarray | None = None) -> None:
        tokens = np.asarray(token_ids, np.int32)
        count = len(tokens)
        if count > self.max_tokens:
            raise EngineError(f"a step of {count} tokens exceeds the runner's {self.max_tokens}")
        if count and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise EngineError(f"token id out of range [0, {self.vocab_size}) for {self.name}")
        # Only tokens and positions are read on this path (the engine owns the cache and
        # the attention; logits() stages its own rows).
        none = np.zeros(0, np.int32)
        self._views = self._stage(tokens, np.asarray(positions, np.int32), none, none, none,
                                  np.zeros(1, np.int32), np.zeros((0, 1), np.int32))
        self._count = count
        self.ops.embed(self._buffers["hidden"][:count], self.weights.embedding,
                       self._views["tokens"], self._embed_scale)

    def layer_attention(self, layer: int) -> LayerAttention:
        spec = self.hp.layer_specs[layer]
        return LayerAttention(spec.window, spec.scale)

    def layer_qkv(self, layer: int) -> tuple[Any, Any, Any]:
        """q ``[T, heads, head_dim]``, k and v ``[T, kv_heads, head_dim]`` (device, the
        cache's type); the same buffers every layer: consume them before the next call."""
        n, b = self._count, self._buffers
        q, k, v = b["q"][:n], b["k"][:n], b["v"][:n]
        self._attention_input(layer, n, q, k, v, self._views["positions"])
        return q, k, v

    def layer_output(self, layer: int, attention: Any) -> None:
        if attention is None:
            raise EngineError("a language model needs every token's attention; run the "
                              "engine with prefill_attention='all'")
        self._attention_output(layer, self._count, attention)

    def logits(self, sample_indices: np.ndarray) -> np.ndarray:
        """float32 ``[len(sample_indices), vocab]`` on the host."""
        count = self._final(sample_indices)
        return self.ops.download(self._buffers["logits"][:count])

    def sample(self, sample_indices: np.ndarray) -> np.ndarray:
        """Greedy: the most likely next token of each sampled row (argmax on the device)."""
        count = self._final(sample_indices)
        self.ops.argmax(self._buffers["next"][:count], self._buffers["logits"][:count])
        return self.ops.download(self._buffers["next"][:count])

    def _final(self, sample_indices: np.ndarray) -> int:
        """Final norm and logits of the given rows; returns how many."""
        indices = np.asarray(sample_indices, np.int32)
        count = len(indices)
        if count > self.max_seqs:
            raise EngineError(f"{count} rows to sample exceed the runner's {self.max_seqs}")
        rows = self._buffers["rows"][:count]
        self.ops.upload(rows, indices)
        self._logits(self._count, count, rows)
        return count

    # ------------------------------------------------------------------ graphs

    def _bucket(self, batch: StepBatch) -> int | None:
        """The graph bucket of a decode-only step, or None when it runs eagerly."""
        if batch.num_decode != batch.num_seqs or batch.num_tokens != batch.num_seqs:
            return None
        if batch.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        return next((b for b in self.graph_batch_sizes if b >= batch.num_seqs), None)

    def _replay(self, batch: StepBatch, bucket: int, key_caches: Sequence[Any],
                value_caches: Sequence[Any]) -> np.ndarray:
        """A decode-only step through the bucket's graph: inputs padded to the bucket."""
        self.decode_graph(batch, key_caches, value_caches, bucket).replay()
        self.stats["graph_replays"] += 1
        self._samples = batch.num_seqs
        return self.ops.download(self._buffers["next"][:batch.num_seqs])

    def decode_graph(self, batch: StepBatch, key_caches: Sequence[Any],
                     value_caches: Sequence[Any], bucket: int | None = None) -> Any:
        """Stages a decode-only ``batch`` (padded to its bucket) and returns the bucket's
        graph, captured on first use; each ``replay()`` then runs that step (benchmarks time
        the graph alone this way)."""
        bucket = bucket if bucket is not None else self._bucket(batch)
        if bucket is None:
            raise EngineError("not a decode-only step within the graphs' batch sizes")
        count, width = batch.num_seqs, self.max_blocks_per_seq
        pad = bucket - count
        tables = np.zeros((bucket, width), np.int32)
        tables[:count, :batch.block_tables.shape[1]] = batch.block_tables
        tokens = np.concatenate([batch.token_ids, np.zeros(pad, np.int32)])
        positions = np.concatenate([batch.positions, np.zeros(pad, np.int32)])
        slots = np.concatenate([batch.slot_mapping, np.full(pad, -1, np.int32)])  # no write
        lens = np.concatenate([batch.context_lens, np.zeros(pad, np.int32)])  # attend nothing
        samples = np.arange(bucket, dtype=np.int32)
        starts = np.arange(bucket + 1, dtype=np.int32)
        views = self._stage(tokens, positions, slots, samples, lens, starts, tables)
        key = tuple(id(c) for c in (*key_caches, *value_caches))
        if key != self._graph_key:  # a new KV pool: graphs captured its old addresses
            self.close_graphs()
            self._graph_key = key
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(views, bucket, key_caches, value_caches)
        return graph

    def _capture(self, views: dict[str, Any], bucket: int, key_caches: Sequence[Any],
                 value_caches: Sequence[Any]) -> Any:
        """Runs the bucket's decode step once (loads modules, picks cuBLAS algorithms), then
        captures the same launches into a graph."""
        workspace = self._buffers["workspace"]
        max_context = self.max_blocks_per_seq * self.block_size

        def record() -> None:
            self._forward(views, bucket, bucket, bucket, bucket, key_caches, value_caches,
                          max_context=max_context, max_query=1, workspace=workspace)

        record()
        self.ops.synchronize()
        graph = self._graphs[bucket] = self.ops.capture(record)
        self.stats["graph_captures"] += 1
        return graph

    def close_graphs(self) -> None:
        """Frees every captured graph (they are captured again when needed)."""
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """What ``engine status`` shows: model, architecture, weights on the device."""
        return describe_model(self, graphs=sorted(self._graphs))

    def close(self) -> None:
        """Frees the graphs and the activation buffers (the weights go with the model)."""
        self.close_graphs()
        self._buffers.clear()



def load_cuda_model(source: str, backend: Any, *, dtype: Any = np.float16, max_tokens: int,
                    max_seqs: int, block_size: int,
                    graph_batch_sizes: Sequence[int] = GRAPH_BATCH_SIZES,
                    on_metadata: Callable[[dict[str, Any]], None] | None = None
                    ) -> CudaTransformer:
    """The model named by ``source`` (an Ollama name or a .gguf path) on ``backend``'s device
    (blocking: call from a worker thread). ``on_metadata`` gets the file's metadata before
    the weights load. Raises ModelFileError, UnsupportedModel or DeviceMemoryError, never
    leaves a half-loaded model."""
    from velod.engine.models.tokenizer import end_of_generation_ids
    from velod.kernels.model_ops import CudaModelOps

    with open_model(source, on_metadata) as (found, gguf, hp):
        ops = CudaModelOps(backend, dtype)
        weights = load_device_weights(gguf, hp, ops, dtype)
        eog_ids = end_of_generation_ids(gguf.metadata)
    runner = CudaTransformer(hp, weights, ops, max_tokens=max_tokens, max_seqs=max_seqs,
                             block_size=block_size,
                             max_blocks_per_seq=-(-hp.context_length // block_size),
                             graph_batch_sizes=graph_batch_sizes, source=str(source),
                             info={"path": str(found.path)})
    runner.eog_ids = eog_ids  # what ends generation, for the engine's stop rule
    return runner
