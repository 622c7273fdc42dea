"""Random-weight GGUF models of real shapes, written with gguf's GGUFWriter (fp16 matrices).

Used by ``bench/gpu_model.py`` on a machine without network: a Llama-3-8B-shaped model (16 GB)
for speed, a Gemma-3-270M-shaped one for CUDA-vs-CPU greedy equality when the real file is not
there. Tensors are streamed to the file one at a time; their values come from one pool of
normal samples per standard deviation, copied from random offsets, so writing 8 B parameters
takes seconds rather than the minutes fresh samples would (the values' statistics, not their
independence, matter for a speed test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

POOL = 1 << 24  # samples per pool


@dataclass(frozen=True)
class Shape:
    """An architecture's sizes, as its GGUF metadata states them."""

    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rope_base: float
    eps: float
    window: int | None = None
    tied: bool = False

    @property
    def matrix_parameters(self) -> int:
        """Parameters of every matrix a decode step reads (the output one included)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        return self.layers * per_layer + self.vocab * self.hidden


LLAMA3_8B = Shape("llama", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                  ffn=14336, vocab=128256, context=8192, rope_base=500000.0, eps=1e-5)
GEMMA3_270M = Shape("gemma3", hidden=640, layers=18, heads=4, kv_heads=1, head_dim=256,
                    ffn=2048, vocab=262144, context=32768, rope_base=1000000.0, eps=1e-6,
                    window=512, tied=True)


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, numpy shape, standard deviation) of every tensor; std 0 marks a norm weight."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    found = [("token_embd.weight", (shape.vocab, h), 1.0), ("output_norm.weight", (h,), 0.0)]
    if not shape.tied:
        found.append(("output.weight", (shape.vocab, h), h ** -0.5))
    for i in range(shape.layers):
        p = f"blk.{i}."
        found += [(p + "attn_norm.weight", (h,), 0.0),
                  (p + "attn_q.weight", (q, h), h ** -0.5),
                  (p + "attn_k.weight", (kv, h), h ** -0.5),
                  (p + "attn_v.weight", (kv, h), h ** -0.5),
                  (p + "attn_output.weight", (h, q), q ** -0.5),
                  (p + "ffn_norm.weight", (h,), 0.0),
                  (p + "ffn_gate.weight", (shape.ffn, h), h ** -0.5),
                  (p + "ffn_up.weight", (shape.ffn, h), h ** -0.5),
                  (p + "ffn_down.weight", (h, shape.ffn), shape.ffn ** -0.5)]
        if shape.arch == "gemma3":
            found += [(p + "attn_q_norm.weight", (shape.head_dim,), 0.0),
                      (p + "attn_k_norm.weight", (shape.head_dim,), 0.0),
                      (p + "post_attention_norm.weight", (h,), 0.0),
                      (p + "post_ffw_norm.weight", (h,), 0.0)]
    return found


def write_random_model(path: Path, shape: Shape, seed: int = 0) -> Path:
    """Writes a random fp16 model of ``shape`` (norm weights float32 near 1) to ``path``."""
    import gguf

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(POOL, dtype=np.float32)
    pools: dict[float, np.ndarray] = {}
    writer = gguf.GGUFWriter(str(path), shape.arch)
    a = shape.arch
    writer.add_string("general.name", f"random {shape.arch} {shape.hidden}x{shape.layers}")
    for key, value in (("context_length", shape.context), ("embedding_length", shape.hidden),
                       ("block_count", shape.layers), ("feed_forward_length", shape.ffn),
                       ("attention.head_count", shape.heads),
                       ("attention.head_count_kv", shape.kv_heads),
                       ("attention.key_length", shape.head_dim),
                       ("attention.value_length", shape.head_dim)):
        writer.add_uint32(f"{a}.{key}", value)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.eps)
    writer.add_float32(f"{a}.rope.freq_base", shape.rope_base)
    if shape.window:
        writer.add_uint32(f"{a}.attention.sliding_window", shape.window)
    plan = tensors(shape)
    for name, dims, std in plan:
        dtype = np.float32 if std == 0.0 else np.float16
        writer.add_tensor_info(name, dims, np.dtype(dtype),
                               int(np.prod(dims)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, dims, std in plan:
        if std == 0.0:
            writer.write_tensor_data(rng.normal(1.0, 0.05, dims).astype(np.float32))
            continue
        pool = pools.get(std)
        if pool is None:
            pool = pools[std] = (base * np.float32(std)).astype(np.float16)
        out = np.empty(int(np.prod(dims)), np.float16)
        for at in range(0, out.size, POOL // 2):
            count = min(POOL // 2, out.size - at)
            offset = int(rng.integers(0, POOL - count + 1))
            out[at:at + count] = pool[offset:offset + count]
        writer.write_tensor_data(out.reshape(dims))
    writer.close()
    return path
