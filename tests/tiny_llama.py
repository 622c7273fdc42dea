"""A tiny random-weight llama GGUF that llama.cpp's server loads and runs in milliseconds.

Written with ``gguf.GGUFWriter`` (llama.cpp's own writer): full attention only, F32 weights,
and a SentencePiece-style vocabulary of the three control tokens plus the 256 byte tokens
(every text falls back to bytes), so llama-server can tokenize, generate and report its KV
cache like for a real model. The one place the tuner's tests get such a model from.
"""

from __future__ import annotations

from pathlib import Path

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, CONTEXT = 2, 256, 4, 2, 64, 512, 4096
CONTROL = ["<unk>", "<s>", "</s>"]


def write_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Writes the model to ``path`` and returns ``path``."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = CONTROL + [f"<0x{b:02X}>" for b in range(256)]
    types = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2
             + [gguf.TokenType.BYTE] * 256)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def tensor(name: str, *shape: int, scale: float | None = None) -> None:
        std = scale if scale is not None else shape[-1] ** -0.5
        writer.add_tensor(name, rng.normal(0.0, std, shape).astype(np.float32))

    tensor("token_embd.weight", len(tokens), HIDDEN, scale=1.0)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    tensor("output.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(p + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        tensor(p + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(p + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        tensor(p + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        writer.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(p + "ffn_gate.weight", FFN, HIDDEN)
        tensor(p + "ffn_up.weight", FFN, HIDDEN)
        tensor(p + "ffn_down.weight", HIDDEN, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
