"""Tokenizer rules that need no oracle: metadata errors, decoding, streaming, special tokens."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from velod.engine.models.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    Tokenizer,
    TokenizerError,
)


def spm(**overrides: Any) -> dict[str, Any]:
    """A hand-made SentencePiece-style vocabulary: a, b, ab, ▁ab, bytes, specials."""
    tokens = ["<unk>", "<s>", "</s>", "<end_of_turn>", "\n",
              *(f"<0x{b:02X}>" for b in range(256)), "▁", "a", "b", "ab", "▁a", "▁ab", "é"]
    types = [UNKNOWN, CONTROL, CONTROL, CONTROL, USER_DEFINED, *[BYTE] * 256,
             *[NORMAL] * 7]
    scores = [0.0] * 261 + [-5.0, -6.0, -7.0, -1.0, -3.0, -2.0, -8.0]
    metadata = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": False,
    }
    metadata.update(overrides)
    return metadata


def ids_of(tokenizer: Tokenizer, *texts: str) -> list[int]:
    return [tokenizer.tokens.index(t) for t in texts]


def test_merges_follow_scores_so_the_best_scoring_token_forms_first() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    # "ab" (-1) beats "▁a" (-3), then "▁" + "ab" forms "▁ab" (-2).
    assert tokenizer.encode(" ab", add_special=False) == ids_of(tokenizer, "▁ab")
    assert tokenizer.encode("aab", add_special=False) == ids_of(tokenizer, "a", "ab")


def test_characters_outside_the_vocabulary_become_byte_tokens() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert tokenizer.encode("a€", add_special=False) == ids_of(
        tokenizer, "a", "<0xE2>", "<0x82>", "<0xAC>")


def test_bos_is_added_only_with_add_special() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert tokenizer.encode("a") == [1, *ids_of(tokenizer, "a")]
    assert tokenizer.encode("a", add_special=False) == ids_of(tokenizer, "a")


def test_control_tokens_in_text_count_only_with_parse_special() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert 3 in tokenizer.encode("a<end_of_turn>", add_special=False)
    assert 3 not in tokenizer.encode("a<end_of_turn>", add_special=False, parse_special=False)


def test_user_defined_tokens_count_even_without_parse_special() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert tokenizer.encode("a\nb", add_special=False, parse_special=False) == ids_of(
        tokenizer, "a", "\n", "b")


def test_space_prefix_goes_before_text_that_follows_a_special_token() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm(**{"tokenizer.ggml.add_space_prefix": True}))
    assert tokenizer.encode("a<end_of_turn>ab", add_special=False) == ids_of(
        tokenizer, "▁a", "<end_of_turn>", "▁ab")


def test_decode_maps_space_marks_and_byte_tokens_back_to_text() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert tokenizer.decode(ids_of(tokenizer, "▁ab", "<0xE2>", "<0x82>", "<0xAC>")) == " ab€"


def test_control_tokens_decode_to_nothing_unless_special_is_asked() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    ids = ids_of(tokenizer, "<s>", "a", "<end_of_turn>")
    assert tokenizer.decode(ids) == "a"
    assert tokenizer.decode(ids, special=True) == "<s>a<end_of_turn>"


def test_detokenizer_holds_back_a_character_split_across_byte_tokens() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    stream = tokenizer.detokenizer()
    pieces = [stream.feed(t) for t in ids_of(tokenizer, "a", "<0xE2>", "<0x82>", "<0xAC>", "b")]
    assert pieces == ["a", "", "", "€", "b"]
    assert stream.flush() == ""


def test_detokenizer_replaces_bytes_that_can_never_form_a_character() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    stream = tokenizer.detokenizer()
    assert stream.feed(ids_of(tokenizer, "<0xE2>")[0]) == ""
    assert stream.feed(ids_of(tokenizer, "a")[0]) == "\ufffda"
    assert stream.feed(ids_of(tokenizer, "<0xE2>")[0]) == ""
    assert stream.flush() == "\ufffd"


def test_bos_and_eos_texts_are_what_chat_templates_get() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert (tokenizer.bos_text, tokenizer.eos_text) == ("<s>", "</s>")
    metadata = spm()
    del metadata["tokenizer.ggml.eos_token_id"]
    assert Tokenizer.from_gguf_metadata(metadata).eos_text == ""


def test_end_of_generation_covers_eos_and_end_of_turn_text() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    assert tokenizer.eog_ids == {2, 3}
    assert tokenizer.is_eog(3) and not tokenizer.is_eog(1)


def test_tokens_found_by_text_end_generation_and_become_control_tokens() -> None:
    metadata = spm()
    tokens = metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"],
                                                  "<|fim_pad|>", "<|im_end|>", "<|fim_prefix|>"]
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"],
                                             USER_DEFINED, NORMAL, USER_DEFINED]
    metadata["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], 0.0, 0.0, 0.0]
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    pad, im_end, prefix = (tokens.index(t) for t in ("<|fim_pad|>", "<|im_end|>",
                                                     "<|fim_prefix|>"))
    assert {pad, im_end} <= tokenizer.eog_ids and prefix not in tokenizer.eog_ids
    assert all(tokenizer.token_types[t] == CONTROL for t in (pad, im_end, prefix))
    assert prefix not in tokenizer.encode("<|fim_prefix|>", parse_special=False)


def test_an_eot_token_named_by_metadata_ends_generation() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm(**{"tokenizer.ggml.eot_token_id": 4}))
    assert tokenizer.eog_ids == {2, 3, 4}


def test_an_empty_token_text_gets_a_placeholder_name_as_in_llama_cpp() -> None:
    metadata = spm()
    metadata["tokenizer.ggml.tokens"] = ["", *metadata["tokenizer.ggml.tokens"][1:]]
    assert Tokenizer.from_gguf_metadata(metadata).token_text(0) == "[EMPTY_0]"


def test_unsupported_tokenizer_model_names_the_supported_ones() -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.model: 'bert' .*llama.*gpt2"):
        Tokenizer.from_gguf_metadata(spm(**{"tokenizer.ggml.model": "bert"}))


def test_unsupported_bpe_pre_tokenizer_names_the_supported_ones() -> None:
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "falcon",
                "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.pre: 'falcon' .*llama-bpe.*qwen2"):
        Tokenizer.from_gguf_metadata(metadata)


def test_a_gguf_without_tokens_is_an_error_naming_the_key() -> None:
    metadata = spm()
    del metadata["tokenizer.ggml.tokens"]
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.tokens: missing"):
        Tokenizer.from_gguf_metadata(metadata)


def test_token_types_of_the_wrong_length_are_an_error() -> None:
    with pytest.raises(TokenizerError, match="token_type: 3 entries for 268 tokens"):
        Tokenizer.from_gguf_metadata(spm(**{"tokenizer.ggml.token_type": [1, 1, 1]}))


def test_asking_for_bos_without_a_bos_id_is_an_error() -> None:
    metadata = spm()
    del metadata["tokenizer.ggml.bos_token_id"]
    metadata["tokenizer.ggml.add_bos_token"] = True
    with pytest.raises(TokenizerError, match=r"bos_token_id: missing, but .*add_bos_token"):
        Tokenizer.from_gguf_metadata(metadata)


def test_decoding_an_id_outside_the_vocabulary_is_an_error() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(spm())
    with pytest.raises(TokenizerError, match="id 9999 is outside the vocabulary"):
        tokenizer.decode([9999])


def test_a_malformed_byte_token_is_an_error() -> None:
    metadata = spm()
    metadata["tokenizer.ggml.tokens"] = ["<0xZZ>" if t == "<0x00>" else t
                                         for t in metadata["tokenizer.ggml.tokens"]]
    with pytest.raises(TokenizerError, match="byte token '<0xZZ>'"):
        Tokenizer.from_gguf_metadata(metadata)


def test_importing_the_module_does_not_load_tokenizers_until_a_tokenizer_is_built() -> None:
    code = ("import sys, velod.engine.models.tokenizer as t; "
            "assert 'tokenizers' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
