"""velod's tokenizer against llama.cpp's llama-tokenize on tiny vocab-only GGUFs of each kind.

SentencePiece-style (scores, byte fallback, space prefix on) and byte-level BPE with the
llama3 and qwen2 pre-tokenizers: a few hundred strings each, with and without special-token
parsing and BOS.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import tiny_vocab
from tests.assets import LlamaTokenize
from tests.tokenizer_corpus import corpus
from velod.engine.models.tokenizer import CONTROL, USER_DEFINED, Tokenizer

pytestmark = pytest.mark.real_model

VOCABULARIES: dict[str, Callable[[], dict[str, Any]]] = {
    "spm": tiny_vocab.spm_metadata,
    "llama-bpe": lambda: tiny_vocab.bpe_metadata("llama-bpe"),
    "qwen2": lambda: tiny_vocab.bpe_metadata("qwen2"),
}


@dataclass
class Vocabulary:
    tokenizer: Tokenizer
    oracle: LlamaTokenize
    strings: list[str]


@pytest.fixture(scope="module", params=list(VOCABULARIES))
def vocab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          llama_bin: Path) -> Vocabulary:
    metadata = VOCABULARIES[request.param]()
    path = tiny_vocab.write_vocab_gguf(
        tmp_path_factory.mktemp("vocab") / f"{request.param}.gguf", metadata)
    strings = corpus(tiny_vocab.special_texts(metadata), mixed=80)
    return Vocabulary(Tokenizer.from_gguf_metadata(metadata), LlamaTokenize(llama_bin, path),
                      strings)


def mismatches(vocab: Vocabulary, **options: bool) -> list[tuple[str, list[int], list[int]]]:
    """(text, velod's ids, llama.cpp's ids) for every string where they differ."""
    with ThreadPoolExecutor(2) as pool:
        expected = list(pool.map(lambda s: vocab.oracle(s, **options), vocab.strings))
    return [(text, ours, theirs) for text, theirs in zip(vocab.strings, expected, strict=True)
            if (ours := vocab.tokenizer.encode(text, **options)) != theirs]


def test_corpus_has_at_least_200_strings_with_special_token_text(vocab: Vocabulary) -> None:
    specials = [t for t, kind in zip(vocab.tokenizer.tokens, vocab.tokenizer.token_types,
                                     strict=True) if kind in (CONTROL, USER_DEFINED)]
    assert len(vocab.strings) >= 200
    assert all(any(s in text for text in vocab.strings) for s in specials)


def test_token_ids_equal_llama_cpp_with_special_tokens_and_bos(vocab: Vocabulary) -> None:
    assert mismatches(vocab) == []


def test_token_ids_equal_llama_cpp_without_special_parsing_or_bos(vocab: Vocabulary) -> None:
    assert mismatches(vocab, add_special=False, parse_special=False) == []


def test_decoding_the_ids_gives_every_string_back(vocab: Vocabulary) -> None:
    tokenizer = vocab.tokenizer
    strings, prefix = vocab.strings, ""
    if tokenizer.add_space_prefix:
        # Decoding keeps the space the encoder put in front (llama-server streams it too),
        # here before the text and after each user-defined token: test texts without those.
        strings = [s for s in strings if s and not any(u in s for u in tiny_vocab.SPM_USER_DEFINED)]
        prefix = " "
    wrong = [text for text in strings
             if tokenizer.decode(tokenizer.encode(text, add_special=False,
                                                  parse_special=False)) != prefix + text]
    assert len(strings) > 150 and wrong == []


@pytest.mark.parametrize("text", ["<<ab>>>", "x<<ab>>>y", "<<ab<<ab>>>", "<<ab>>"])
def test_longest_special_token_is_cut_out_first_wherever_it_is(
        text: str, tmp_path: Path, llama_bin: Path) -> None:
    # "<<ab" and "ab>>>" overlap in "<<ab>>>": llama.cpp takes the longer one, not the first.
    metadata = tiny_vocab.spm_metadata()
    oracle = LlamaTokenize(llama_bin, tiny_vocab.write_vocab_gguf(tmp_path / "v.gguf", metadata))
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    ids = tokenizer.encode(text)
    assert ids == oracle(text)
    if ">>>" in text:
        assert tokenizer.tokens.index("ab>>>") in ids
