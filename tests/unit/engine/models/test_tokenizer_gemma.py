"""velod's tokenizer on the real Gemma 3 270M vocabulary (262,144 tokens) against llama.cpp.

The bulk goes through llama-server's /tokenize (one model load for a few hundred strings;
llama-tokenize loads the vocabulary anew for every string, 0.4 s each); a sample shows the
two agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.assets import LlamaServer, LlamaTokenize, llama_server
from tests.tokenizer_corpus import corpus
from velod.engine.models.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>",
            "<unused0>", "<unused99>", "[multimodal]", "<start_of_image>", "<table>", "</td>",
            "\n\n", "\t\t"]


@pytest.fixture(scope="module")
def tokenizer(gemma_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma_metadata)


@pytest.fixture(scope="module")
def server(gemma_gguf: Path) -> Iterator[LlamaServer]:
    with llama_server(gemma_gguf, "-np", "1", ctx=2048) as running:
        yield running


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return corpus(SPECIALS)


def test_gemma_corpus_has_at_least_200_strings(strings: list[str]) -> None:
    assert len(strings) >= 200


@pytest.mark.parametrize(("add_special", "parse_special"), [(True, True), (False, False),
                                                            (False, True)])
def test_gemma_token_ids_equal_llama_cpp(tokenizer: Tokenizer, server: LlamaServer,
                                         strings: list[str], add_special: bool,
                                         parse_special: bool) -> None:
    options = {"add_special": add_special, "parse_special": parse_special}
    wrong = [(text, ours, theirs) for text in strings
             if (ours := tokenizer.encode(text, **options))
             != (theirs := server.tokenize(text, **options))]
    assert wrong == []


def test_llama_server_tokenize_agrees_with_llama_tokenize(
        server: LlamaServer, gemma_tokenize: LlamaTokenize, strings: list[str]) -> None:
    sample = [*strings[::40], "<start_of_turn>user\nHi<end_of_turn>\n", "a  b\t\tc"]
    assert [server.tokenize(s) for s in sample] == [gemma_tokenize(s) for s in sample]


def test_gemma_decode_gives_every_string_back(tokenizer: Tokenizer, strings: list[str]) -> None:
    wrong = [s for s in strings
             if tokenizer.decode(tokenizer.encode(s, add_special=False, parse_special=False)) != s]
    assert wrong == []


def test_gemma_stream_never_emits_half_a_character(tokenizer: Tokenizer,
                                                   strings: list[str]) -> None:
    for text in strings:
        detokenizer = tokenizer.detokenizer()
        pieces = [detokenizer.feed(t)
                  for t in tokenizer.encode(text, add_special=False, parse_special=False)]
        pieces.append(detokenizer.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_gemma_rare_character_comes_as_byte_tokens_and_streams_whole(
        tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("𓀀", add_special=False)
    assert [tokenizer.token_text(i) for i in ids] == ["<0xF0>", "<0x93>", "<0x80>", "<0x80>"]
    detokenizer = tokenizer.detokenizer()
    assert [detokenizer.feed(i) for i in ids] == ["", "", "", "𓀀"]


def test_gemma_special_tokens_and_end_of_generation(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_text(tokenizer.bos_id) == "<bos>"  # type: ignore[arg-type]
    assert tokenizer.token_text(tokenizer.eos_id) == "<eos>"  # type: ignore[arg-type]
    end_of_turn = tokenizer.encode("<end_of_turn>", add_special=False)
    assert len(end_of_turn) == 1 and tokenizer.is_eog(end_of_turn[0])
    assert tokenizer.is_eog(tokenizer.eos_id)  # type: ignore[arg-type]
    assert tokenizer.decode(end_of_turn) == ""
    assert tokenizer.decode(end_of_turn, special=True) == "<end_of_turn>"
