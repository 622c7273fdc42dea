"""Tiny byte-level BPE vocabularies (llama3 and qwen2 pre-tokenizers) as GGUF metadata.

No small real BPE GGUF is to be had from a package registry, so these are trained here with
``tokenizers``' BpeTrainer on a few kilobytes of text, then written as vocab-only GGUFs that
llama.cpp's ``llama-tokenize`` loads: the oracle sees exactly the vocabulary velod sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.tokenizer_corpus import base_strings
from velod.engine.models import tokenizer as tk

# Control tokens each family really has, plus user-defined ones (matched even without
# parse_special) to exercise llama.cpp's special-token partition.
SPECIALS = {
    "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"],
}
# (BOS, EOS) as the instruct models' GGUFs name them.
BOS_EOS = {"llama-bpe": ("<|begin_of_text|>", "<|eot_id|>"),
           "qwen2": ("<|endoftext|>", "<|im_end|>")}
USER_DEFINED = ["<tool_call>", "</tool_call>", "<think>"]


def _training_text() -> list[str]:
    """A few kilobytes of prose, code, digits and scripts to learn merges from."""
    import difflib
    import json as json_module
    import textwrap

    docs = [textwrap.__doc__ or "", json_module.__doc__ or "", difflib.__doc__ or ""]
    return docs + base_strings()


def bpe_metadata(pre: str, vocab_size: int = 1200) -> dict[str, Any]:
    """``tokenizer.ggml.*`` metadata of a freshly trained BPE vocabulary for ``pre``."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tk.PRE_TOKENIZERS[pre].regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(_training_text(), trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [tk.NORMAL] * len(tokens)
    for text in SPECIALS[pre]:
        tokens.append(text)
        types.append(tk.CONTROL)
    for text in USER_DEFINED:
        tokens.append(text)
        types.append(tk.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    bos, eos = BOS_EOS[pre]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index(bos),
        "tokenizer.ggml.eos_token_id": tokens.index(eos),
        "tokenizer.ggml.add_bos_token": pre != "qwen2",
    }


# SentencePiece-style extras: two overlapping user-defined tokens (llama.cpp cuts the longer
# one out first, wherever it is) and a control token.
SPM_USER_DEFINED = ["<tool_call>", "<<ab", "ab>>>"]
SPM_CONTROL = ["<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]


def spm_metadata(vocab_size: int = 600) -> dict[str, Any]:
    """``tokenizer.ggml.*`` metadata of a trained SentencePiece-style vocabulary.

    Pieces carry SentencePiece BPE scores (a merged piece scores minus its merge's rank);
    characters the training text lacks fall back to the 256 ``<0xHH>`` byte tokens;
    ``add_space_prefix`` is on, as in Llama 2 (Gemma has it off: both paths get tested).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    trained = HFTokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trained.train_from_iterator(_training_text(), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, limit_alphabet=150))
    model = json.loads(trained.to_str())["model"]
    merged = {("".join(m) if not isinstance(m, str) else m.replace(" ", "")): rank
              for rank, m in enumerate(model["merges"])}
    tokens = ["<unk>", *SPM_CONTROL, *SPM_USER_DEFINED]
    types = [tk.UNKNOWN, *[tk.CONTROL] * len(SPM_CONTROL),
             *[tk.USER_DEFINED] * len(SPM_USER_DEFINED)]
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(tk.BYTE)
        scores.append(0.0)
    for text in sorted(model["vocab"], key=model["vocab"].get):
        tokens.append(text)
        types.append(tk.NORMAL)
        scores.append(-float(merged.get(text, len(merged) + model["vocab"][text])))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": tokens.index("<s>"),
        "tokenizer.ggml.eos_token_id": tokens.index("</s>"),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }


def write_vocab_gguf(path: Path, metadata: dict[str, Any], arch: str = "llama") -> Path:
    """A GGUF with ``metadata``, the hyperparameters llama.cpp insists on, and no tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    add_vocab(writer, metadata)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_vocab(writer: Any, metadata: dict[str, Any]) -> None:
    """Writes the ``tokenizer.ggml.*`` keys of ``metadata`` with a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in metadata:
        writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in metadata:
        writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_space_prefix" in metadata:
        writer.add_add_space_prefix(metadata["tokenizer.ggml.add_space_prefix"])
    if "tokenizer.ggml.unknown_token_id" in metadata:
        writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])


def special_texts(metadata: dict[str, Any]) -> Sequence[str]:
    """The texts of the vocabulary's control and user-defined tokens."""
    types = metadata["tokenizer.ggml.token_type"]
    return [t for t, kind in zip(metadata["tokenizer.ggml.tokens"], types, strict=True)
            if kind in (tk.CONTROL, tk.USER_DEFINED, tk.UNKNOWN)]
