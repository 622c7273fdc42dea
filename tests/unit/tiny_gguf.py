"""Tiny random-weight GGUF models of each architecture, written with gguf's own GGUFWriter.

Sizes are the smallest that every quantization fits (k-quants pack 256 values per block
along a row, so rows are 256 or 512 long); each architecture mixes tensor types the way
real files do. Quantized tensors hold random blocks whose scales are small finite halves,
so values stay in the range of real weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 4, 2, 64, 512, 97
# Byte offsets of the float16 scale fields inside each k-quant block (they must be finite).
_HALF_FIELDS = {
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass
class TinySpec:
    """What to write: architecture, layer count, tensor types per role, extra metadata."""

    arch: str
    layers: int = 2
    types: dict[str, str] = field(default_factory=dict)   # role -> GGML type name
    tied: bool = False
    biases: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    rope_factors: bool = False
    window: int | None = None
    metadata: dict[str, object] = field(default_factory=dict)


SPECS = {
    "llama": TinySpec("llama", layers=2, rope_factors=True, metadata={"rope.freq_base": 500000.0},
                      types={"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_K",
                             "attn_v": "Q6_K", "attn_output": "Q3_K", "ffn_gate": "Q2_K",
                             "ffn_up": "Q4_0", "ffn_down": "Q5_1", "output": "F16"}),
    "qwen2": TinySpec("qwen2", layers=2, tied=True, biases=True,
                      metadata={"rope.freq_base": 1000000.0},
                      types={"token_embd": "Q6_K", "attn_q": "Q8_0", "attn_k": "Q4_1",
                             "attn_v": "Q5_0", "attn_output": "BF16", "ffn_gate": "F16",
                             "ffn_up": "F32", "ffn_down": "Q4_K"}),
    # Six layers: five sliding-window layers, then the global one (gemma3's pattern).
    "gemma3": TinySpec("gemma3", layers=6, tied=True, qk_norm=True, post_norms=True, window=6,
                       metadata={"rope.freq_base": 1000000.0},
                       types={"token_embd": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0",
                              "attn_v": "Q8_0", "attn_output": "Q4_K", "ffn_gate": "Q5_0",
                              "ffn_up": "Q5_0", "ffn_down": "Q6_K"}),
}


def quantized(rng: np.random.Generator, rows: int, cols: int, type_name: str,
              std: float) -> np.ndarray:
    """A ``[rows, cols]`` tensor in ``type_name`` as the array GGUFWriter.add_tensor takes."""
    if type_name == "F32":
        return rng.normal(0, std, (rows, cols)).astype(np.float32)
    if type_name == "F16":
        return rng.normal(0, std, (rows, cols)).astype(np.float16)
    qtype = GGMLQuantizationType[type_name]
    if type_name == "BF16" or type_name in _LEGACY:
        values = rng.normal(0, std, (rows, cols)).astype(np.float32)
        return gguf.quants.quantize(values, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    # Scales such that the decoded values have about the asked standard deviation.
    scale = {"Q2_K": std / 12, "Q3_K": std / 80, "Q4_K": std / 60, "Q5_K": std / 120,
             "Q6_K": std / 500}.get(type_name, std)
    for offset in _HALF_FIELDS.get(type_name, ()):  # other types: random bytes as they are
        halves = rng.uniform(0.5, 1.5, blocks.shape[0]).astype(np.float16) * np.float16(scale)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * size)


def write_tiny(path: Path, spec: TinySpec, seed: int = 0,
               vocab: dict[str, Any] | None = None) -> Path:
    """Writes ``spec``'s model to ``path`` and returns it; with ``vocab`` (tokenizer.ggml.*
    metadata, see tests/tiny_vocab.py) the model has that tokenizer and vocabulary size."""
    rng = np.random.default_rng(seed)
    arch = spec.arch
    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = VOCAB
    if vocab is not None:
        from tests.tiny_vocab import add_vocab

        add_vocab(writer, vocab)
        vocab_size = len(vocab["tokenizer.ggml.tokens"])
    writer.add_string("general.name", f"tiny-{arch}")
    writer.add_uint32(f"{arch}.context_length", 4096)
    writer.add_uint32(f"{arch}.embedding_length", HIDDEN)
    writer.add_uint32(f"{arch}.block_count", spec.layers)
    writer.add_uint32(f"{arch}.feed_forward_length", FFN)
    writer.add_uint32(f"{arch}.attention.head_count", HEADS)
    writer.add_uint32(f"{arch}.attention.head_count_kv", KV_HEADS)
    writer.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
    writer.add_uint32(f"{arch}.attention.value_length", HEAD_DIM)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if spec.window:
        writer.add_uint32(f"{arch}.attention.sliding_window", spec.window)
    for key, value in spec.metadata.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_key_value(f"{arch}.{key}", value, gguf.GGUFValueType.UINT32)

    def matrix(name: str, role: str, rows: int, cols: int, std: float) -> None:
        type_name = spec.types.get(role, "F32")
        array = quantized(rng, rows, cols, type_name, std)
        raw = None if type_name in ("F32", "F16") else GGMLQuantizationType[type_name]
        writer.add_tensor(name, array, raw_dtype=raw)

    def vector(name: str, size: int, mean: float, std: float) -> None:
        writer.add_tensor(name, rng.normal(mean, std, size).astype(np.float32))

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    matrix("token_embd.weight", "token_embd", vocab_size, HIDDEN, 1.0)
    vector("output_norm.weight", HIDDEN, 1.0, 0.1)
    if not spec.tied:
        matrix("output.weight", "output", vocab_size, HIDDEN, HIDDEN ** -0.5)
    if spec.rope_factors:  # Llama 3 style: low frequencies slowed down, high ones kept
        factors = np.ones(HEAD_DIM // 2, np.float32)
        factors[HEAD_DIM // 4:] = np.linspace(1.0, 8.0, HEAD_DIM // 4, dtype=np.float32)
        writer.add_tensor("rope_freqs.weight", factors)
    for i in range(spec.layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", HIDDEN, 1.0, 0.1)
        matrix(p + "attn_q.weight", "attn_q", q, HIDDEN, HIDDEN ** -0.5)
        matrix(p + "attn_k.weight", "attn_k", kv, HIDDEN, HIDDEN ** -0.5)
        matrix(p + "attn_v.weight", "attn_v", kv, HIDDEN, HIDDEN ** -0.5)
        if spec.biases:
            vector(p + "attn_q.bias", q, 0.0, 0.5)
            vector(p + "attn_k.bias", kv, 0.0, 0.5)
            vector(p + "attn_v.bias", kv, 0.0, 0.5)
        if spec.qk_norm:
            vector(p + "attn_q_norm.weight", HEAD_DIM, 1.0, 0.1)
            vector(p + "attn_k_norm.weight", HEAD_DIM, 1.0, 0.1)
        matrix(p + "attn_output.weight", "attn_output", HIDDEN, q, q ** -0.5)
        vector(p + "ffn_norm.weight", HIDDEN, 1.0, 0.1)
        matrix(p + "ffn_gate.weight", "ffn_gate", FFN, HIDDEN, HIDDEN ** -0.5)
        matrix(p + "ffn_up.weight", "ffn_up", FFN, HIDDEN, HIDDEN ** -0.5)
        matrix(p + "ffn_down.weight", "ffn_down", HIDDEN, FFN, FFN ** -0.5)
        if spec.post_norms:
            vector(p + "post_attention_norm.weight", HIDDEN, 1.0, 0.1)
            vector(p + "post_ffw_norm.weight", HIDDEN, 1.0, 0.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
