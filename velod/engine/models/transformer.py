"""The decoder-only transformer of llama, qwen2 and gemma3 GGUFs, driven step by step.

Per step the engine hands the flat tokens and positions of every scheduled sequence
(``begin_step``); per layer the model gives q, k and v after biases, norms and RoPE
(``layer_qkv``), the engine writes K/V into its paged cache and runs attention, and hands the
output back (``layer_output``: output projection, residual, MLP). At the end ``logits`` (or
``sample``) for the rows to sample. Every matrix is one GEMM over all the step's rows; the
differences between architectures are the switches of ``HParams.arch``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import velod.engine.models.ops as ops
from velod.engine.core.errors import EngineError
from velod.engine.models.hparams import HParams, Rope, describe_model
from velod.engine.models.protocol import LayerAttention
from velod.engine.models.weights import Weights
from velod.kernels.layout import from_float32, to_float32


class TransformerModel:
    """A loaded model: hyperparameters, float32 weights and the current step's activations."""

    def __init__(self, hp: HParams, weights: Weights, *, dtype: Any = np.float32,
                 source: str = "", info: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None,
                 eog_ids: frozenset[int] = frozenset()) -> None:
        self.hp = hp
        self.geometry = hp.geometry
        self.metadata = metadata or {}  # the GGUF's (tokenizer, chat template for callers)
        self.eog_ids = eog_ids
        self.weights = weights
        self.dtype = np.dtype(dtype)   # the KV cache's element type (uint16 = bfloat16)
        self.name = hp.name
        self.kind = f"{hp.arch.name} language model (GGUF weights)"
        self.source = source
        self.info = info or {}
        self.vocab_size = hp.vocab_size
        self.layers, self.heads, self.kv_heads = hp.layers, hp.heads, hp.kv_heads
        self.head_dim, self.context_length = hp.head_dim, hp.context_length
        self._activation = ops.ACTIVATIONS[hp.arch.activation]
        self._embed_scale = np.float32(np.sqrt(hp.hidden)) if hp.arch.embed_scale else None
        self._inverse = {spec.rope: ops.rope_inverse_frequencies(spec.rope,
                                                                 weights.rope_factors)
                         for spec in hp.layer_specs}
        self._attention = [LayerAttention(spec.window, spec.scale) for spec in hp.layer_specs]
        self._hidden = np.zeros((0, hp.hidden), np.float32)
        self._tables: dict[Rope, tuple[np.ndarray, np.ndarray]] = {}
        self._keep: np.ndarray | None = None
        self._kept = False
        self._logits = np.zeros((0, hp.vocab_size), np.float32)

    # ------------------------------------------------------------------ the step

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray,
                   sample_indices: np.ndarray | None = None) -> None:
        tokens = np.asarray(token_ids, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise EngineError(f"token id out of range [0, {self.vocab_size}) for {self.name}")
        hidden = self.weights.embed(tokens)
        if self._embed_scale is not None:
            hidden *= self._embed_scale
        self._hidden = hidden
        self._tables = {rope: ops.rope_tables(np.asarray(positions), inverse)
                        for rope, inverse in self._inverse.items()}
        self._keep = None if sample_indices is None else np.asarray(sample_indices, np.int64)
        self._kept = False

    def layer_attention(self, layer: int) -> LayerAttention:
        return self._attention[layer]

    def layer_qkv(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hp, w = self.hp, self.weights.layers[layer]
        count = self._hidden.shape[0]
        x = ops.rms_norm(self._hidden, w.attn_norm, hp.rms_eps)
        qkv = ops.linear(x, w.wqkv, w.bqkv)
        q = qkv[:, :hp.q_width].reshape(count, hp.heads, hp.head_dim)
        k = qkv[:, hp.q_width:hp.q_width + hp.kv_width].reshape(count, hp.kv_heads,
                                                                 hp.head_dim)
        v = qkv[:, hp.q_width + hp.kv_width:].reshape(count, hp.kv_heads, hp.head_dim)
        if hp.arch.qk_norm:
            q = ops.rms_norm(q, w.q_norm, hp.rms_eps)
            k = ops.rms_norm(k, w.k_norm, hp.rms_eps)
        rope = hp.layer_specs[layer].rope
        cos, sin = self._tables[rope]
        ops.apply_rope(q, cos, sin, rope.style)
        ops.apply_rope(k, cos, sin, rope.style)
        return self._cache_type(q), self._cache_type(k), self._cache_type(v)

    def layer_output(self, layer: int, attention: Any) -> None:
        if attention is None:
            raise EngineError("a language model needs every token's attention; run the "
                              "engine with prefill_attention='all'")
        hp, w = self.hp, self.weights.layers[layer]
        out = to_float32(np.asarray(attention)).reshape(-1, hp.q_width)
        hidden = self._hidden
        if layer == hp.layers - 1 and self._keep is not None:
            # Only the sampled rows go on: the rest of the last layer is wasted work.
            out, hidden = out[self._keep], hidden[self._keep]
            self._kept = True
        projected = ops.linear(out, w.wo)
        if hp.arch.post_norms:
            projected = ops.rms_norm(projected, w.post_attn_norm, hp.rms_eps)
        hidden += projected
        mlp = ops.linear(self._activation(ops.linear(ops.rms_norm(hidden, w.ffn_norm,
                                                                  hp.rms_eps), w.wgu)),
                         w.wdown)
        if hp.arch.post_norms:
            mlp = ops.rms_norm(mlp, w.post_ffn_norm, hp.rms_eps)
        hidden += mlp
        self._hidden = hidden

    def logits(self, sample_indices: np.ndarray) -> np.ndarray:
        """float32 ``[len(sample_indices), vocab]``, valid until the next ``logits`` call."""
        indices = np.asarray(sample_indices, np.int64)
        if self._kept:
            if self._keep is None or not np.array_equal(indices, self._keep):
                raise EngineError("logits asked for other rows than begin_step's "
                                  "sample_indices")
            rows = self._hidden
        else:
            rows = self._hidden[indices]
        normed = ops.rms_norm(rows, self.weights.output_norm, self.hp.rms_eps)
        # A fresh [rows, vocab] array would page-fault its way in every step (33 MB at 32
        # rows of Gemma 3): the buffer is kept, and the result is valid until the next call.
        if self._logits.shape[0] < len(normed):
            self._logits = np.empty((len(normed), self.vocab_size), np.float32)
        out = self._logits[:len(normed)]
        return ops.linear_t(normed, self.weights.output_t, out=out)

    def sample(self, sample_indices: np.ndarray) -> np.ndarray:
        """Greedy: the most likely next token of each sampled row."""
        return self.logits(sample_indices).argmax(axis=-1).astype(np.int32)

    def _cache_type(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == np.float32:
            return x
        return from_float32(x, self.dtype)

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """What ``engine status`` shows: model, architecture, quantization, weight memory."""
        return describe_model(self)

    def close(self) -> None:
        """Drops the step's activations (the weights go with the model)."""
        self._hidden = np.zeros((0, self.hp.hidden), np.float32)
        self._tables = {}
        self._logits = np.zeros((0, self.vocab_size), np.float32)
