"""An independent dense forward pass of llama / qwen2 / gemma3 GGUFs, for the tests.

Written apart from ``velod.engine.models``: tensors are dequantized by ``gguf.quants``
(llama.cpp's Python package), the math is float64, attention is a full causal (and sliding
window) softmax over the whole sequence with no cache and no blocks, and RoPE is a complex
rotation. The only thing shared with the engine is the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGUFReader, quants


class DenseModel:
    """All tensors of a GGUF as float64 arrays, and a forward pass over a whole sequence."""

    def __init__(self, path: Path) -> None:
        reader = GGUFReader(str(path))
        self.meta = {k: f.contents() for k, f in reader.fields.items()}
        self.arch = self.meta["general.architecture"]
        self.t = {}
        for tensor in reader.tensors:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            self.t[tensor.name] = np.asarray(values, np.float64).reshape(shape)

    def m(self, key, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def forward(self, tokens: list[int]) -> np.ndarray:
        """Logits ``[len(tokens), vocab]`` at every position."""
        arch, t = self.arch, self.t
        hidden, layers = self.m("embedding_length"), self.m("block_count")
        heads, kv_heads = self.m("attention.head_count"), self.m("attention.head_count_kv")
        dim = self.m("attention.key_length")
        eps = self.m("attention.layer_norm_rms_epsilon")
        gemma = arch == "gemma3"
        n = len(tokens)
        x = t["token_embd.weight"][tokens]
        if gemma:
            x = x * math.sqrt(hidden)
        for i in range(layers):
            p = f"blk.{i}."
            windowed = gemma and i % 6 != 5
            base = 10000.0 if windowed else self.m("rope.freq_base", 10000.0)
            h = rms(x, t[p + "attn_norm.weight"], eps)
            q = h @ t[p + "attn_q.weight"].T + t.get(p + "attn_q.bias", 0.0)
            k = h @ t[p + "attn_k.weight"].T + t.get(p + "attn_k.bias", 0.0)
            v = h @ t[p + "attn_v.weight"].T + t.get(p + "attn_v.bias", 0.0)
            q, k, v = (a.reshape(n, -1, dim) for a in (q, k, v))
            if gemma:
                q = rms(q, t[p + "attn_q_norm.weight"], eps)
                k = rms(k, t[p + "attn_k_norm.weight"], eps)
            q = rotate(q, base, t.get("rope_freqs.weight"), interleaved=arch == "llama")
            k = rotate(k, base, t.get("rope_freqs.weight"), interleaved=arch == "llama")
            window = self.m("attention.sliding_window") if windowed else None
            a = attend(q, k, v, 1.0 / math.sqrt(dim), window).reshape(n, heads * dim)
            assert heads % kv_heads == 0
            o = a @ t[p + "attn_output.weight"].T
            if gemma:
                o = rms(o, t[p + "post_attention_norm.weight"], eps)
            x = x + o
            h = rms(x, t[p + "ffn_norm.weight"], eps)
            gate, up = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
            if gemma:
                act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi)
                                                * (gate + 0.044715 * gate**3)))
            else:
                act = gate / (1 + np.exp(-gate))
            f = (act * up) @ t[p + "ffn_down.weight"].T
            if gemma:
                f = rms(f, t[p + "post_ffw_norm.weight"], eps)
            x = x + f
        x = rms(x, t["output_norm.weight"], eps)
        return x @ t.get("output.weight", t["token_embd.weight"]).T


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def rotate(x: np.ndarray, base: float, factors, interleaved: bool) -> np.ndarray:
    """RoPE as complex multiplication: pairs (2i, 2i+1) when interleaved, else (i, i+d/2)."""
    n, _, dim = x.shape
    freq = base ** (-np.arange(0, dim, 2) / dim)
    if factors is not None:
        freq = freq / factors
    turn = np.exp(1j * np.arange(n)[:, None] * freq[None, :])[:, None, :]
    if interleaved:
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    half = dim // 2
    z = (x[..., :half] + 1j * x[..., half:]) * turn
    return np.concatenate([z.real, z.imag], axis=-1)


def attend(q, k, v, scale, window):
    """Causal softmax attention, grouped kv heads; ``window`` limits each row's past."""
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    out = np.empty_like(q)
    pos = np.arange(n)
    visible = pos[None, :] <= pos[:, None]
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    for h in range(heads):
        s = q[:, h] @ k[:, h // group].T * scale
        s = np.where(visible, s, -np.inf)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (w / w.sum(axis=1, keepdims=True)) @ v[:, h // group]
    return out
