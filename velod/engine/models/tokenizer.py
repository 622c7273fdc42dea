"""Text to token ids and back, exactly as llama.cpp does it, from a GGUF's own tokenizer metadata.

Two vocabulary kinds (``tokenizer.ggml.model``):

- ``llama``: SentencePiece-style BPE over characters with byte fallback (Gemma, Llama 2).
  The GGUF has scores, no merges; the merges are derived from the scores as transformers'
  GGUF loader does: every split of a token into two tokens is a merge, ranked by the
  token's score. Spaces become ``▁``; a leading one is added where llama.cpp adds it.
- ``gpt2``: byte-level BPE with the GGUF's merges, after the pre-tokenizer regex named by
  ``tokenizer.ggml.pre`` (llama3 and qwen2 families).

The BPE itself runs in Hugging Face ``tokenizers`` (imported on first build). Special tokens
are cut out of the text first, as llama.cpp's ``tokenizer_st_partition`` does: user-defined
tokens always, control tokens when ``parse_special``; longer tokens first. Decoding maps
each token to its bytes (llama.cpp's ``token_to_piece``); :class:`Detokenizer` streams them
without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as end of generation (llama-vocab.cpp, "special_eog_ids"),
# beside the tokens of the EOG roles below. It marks them as control tokens too.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})
# Special roles llama.cpp finds by text when the GGUF names no tokenizer.ggml.<role>_token_id;
# a token found so becomes a control token.
ROLE_TEXTS: Mapping[str, tuple[str, ...]] = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
EOG_ROLES = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")

# Pre-tokenizer regexes of llama.cpp's BPE vocabularies (unicode.cpp), by tokenizer.ggml.pre.
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """How a BPE vocabulary splits text before merging."""

    regex: str
    ignore_merges: bool  # a whole pre-token that is in the vocabulary is used as is
    add_bos: bool  # llama.cpp's default when the GGUF does not say


_LLAMA3 = PreTokenizer(_LLAMA3_REGEX, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(_QWEN2_REGEX, ignore_merges=False, add_bos=False)
PRE_TOKENIZERS: Mapping[str, PreTokenizer] = {
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2,
}
MODELS = {"llama": "SentencePiece-style BPE", "gpt2": "byte-level BPE"}


class TokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing, malformed or of an unsupported kind."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _special_pattern(texts: Iterable[str]) -> re.Pattern[str]:
    """A regex that finds, at every position, the longest of ``texts`` starting there.

    The texts are laid out as a trie, so one scan costs about the same for 10 specials as
    for 10,000 (Gemma has 6,400).
    """
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(f"(?=({build(trie)}))", re.DOTALL)


class _SpecialMatcher:
    """Cuts special tokens out of text the way llama.cpp's tokenizer_st_partition does."""

    def __init__(self, specials: Mapping[str, int]) -> None:
        self.ids = dict(specials)
        self.pattern = _special_pattern(specials) if specials else None
        # Shorter specials that begin another one, which the trie's longest match hides.
        self.prefixes = {text: [text[:k] for k in range(1, len(text)) if text[:k] in specials]
                         for text in specials}

    def partition(self, text: str) -> list[str | int]:
        """``text`` as raw-text fragments and special token ids, in order."""
        if self.pattern is None or not text:
            return [text] if text else []
        present: set[str] = set()
        for match in self.pattern.finditer(text):
            longest = match.group(1)
            present.add(longest)
            present.update(self.prefixes[longest])
        fragments: list[str | int] = [text]
        # llama.cpp splits by each special in turn, longest first, left to right.
        for special in sorted(present, key=lambda s: (-len(s), self.ids[s])):
            token, cut = self.ids[special], []
            for fragment in fragments:
                if isinstance(fragment, int):
                    cut.append(fragment)
                    continue
                start = 0
                while (found := fragment.find(special, start)) >= 0:
                    if found > start:
                        cut.append(fragment[start:found])
                    cut.append(token)
                    start = found + len(special)
                if start < len(fragment):
                    cut.append(fragment[start:])
            fragments = cut
        return fragments


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise TokenizerError(key, "missing from the GGUF's metadata (re-convert the model "
                                  "with llama.cpp's convert_hf_to_gguf.py)")
    return metadata[key]


def _per_token(metadata: Mapping[str, Any], key: str, n_tokens: int, kind: type,
               default: Any) -> list[Any]:
    """A per-token array (types, scores) of the vocabulary's length; default if absent."""
    values = [kind(v) for v in metadata.get(key, [default] * n_tokens)]
    if len(values) != n_tokens:
        raise TokenizerError(key, f"{len(values)} entries for {n_tokens} tokens")
    return values


def _end_of_generation(metadata: Mapping[str, Any], vocab: Mapping[str, int],
                       types: list[int]) -> frozenset[int]:
    """The tokens that end generation, as llama.cpp finds them; marks them control tokens.

    The tokens of the EOG roles (named by metadata or found by text) and every token whose
    text is in EOG_TEXTS. ``types`` is updated in place.
    """
    roles: dict[str, int | None] = {
        "eos": _optional_id(metadata, "tokenizer.ggml.eos_token_id", len(types))}
    for role, texts in ROLE_TEXTS.items():
        found = _optional_id(metadata, f"tokenizer.ggml.{role}_token_id", len(types))
        if found is None:
            found = next((vocab[text] for text in texts if text in vocab), None)
            if found is not None:
                types[found] = CONTROL
        roles[role] = found
    eog = {token for role in EOG_ROLES if (token := roles[role]) is not None}
    for text in EOG_TEXTS & vocab.keys():
        eog.add(vocab[text])
        types[vocab[text]] = CONTROL
    return frozenset(eog)


def _optional_id(metadata: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_tokens:
        return None  # llama.cpp ignores an out-of-range special id, and so do we
    return value


class Tokenizer:
    """Encodes text to token ids and decodes them, identical to llama.cpp for this vocabulary.

    Build it with :meth:`from_gguf_metadata`; thread-safe for concurrent ``encode`` calls.
    """

    def __init__(self, *, model: str, tokens: Sequence[str], token_types: Sequence[int],
                 backend: Any, pre: str | None, bos_id: int | None, eos_id: int | None,
                 eog_ids: frozenset[int], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool) -> None:
        self.model = model
        self.pre = pre
        self.tokens = tokens
        self.token_types = token_types
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = eog_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self._backend = backend
        specials = {text: i for i, (text, kind) in enumerate(zip(tokens, token_types, strict=True))
                    if kind in (CONTROL, UNKNOWN, USER_DEFINED) and text}
        user_defined = {t: i for t, i in specials.items() if token_types[i] == USER_DEFINED}
        self._all_specials = _SpecialMatcher(specials)
        self._user_defined = _SpecialMatcher(user_defined)
        self._pieces = self._build_pieces()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF describes (``tokenizer.ggml.*`` keys, plain values).

        TokenizerError names the key when the metadata is missing, inconsistent, or of a
        kind not supported (the message lists what is).
        """
        model = str(_required(metadata, "tokenizer.ggml.model"))
        if model not in MODELS:
            supported = ", ".join(f"{k} ({v})" for k, v in MODELS.items())
            raise TokenizerError("tokenizer.ggml.model",
                                 f"{model!r} is not supported; supported: {supported}")
        # An empty text is renamed, as llama.cpp does, so that every token has one.
        tokens = [str(t) or f"[EMPTY_{i}]"
                  for i, t in enumerate(_required(metadata, "tokenizer.ggml.tokens"))]
        if not tokens:
            raise TokenizerError("tokenizer.ggml.tokens", "empty vocabulary")
        vocab = {text: i for i, text in enumerate(tokens)}  # a repeated text keeps its last id
        types = _per_token(metadata, "tokenizer.ggml.token_type", len(tokens), int, NORMAL)
        pre_name: str | None = None
        pre: PreTokenizer | None = None
        if model == "gpt2":
            pre_name = str(metadata.get("tokenizer.ggml.pre", "default"))
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise TokenizerError("tokenizer.ggml.pre", (
                    f"{pre_name!r} is not a supported BPE pre-tokenizer; supported: "
                    + ", ".join(sorted(PRE_TOKENIZERS))))
        eog = _end_of_generation(metadata, vocab, types)
        bos = _optional_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens))
        eos = _optional_id(metadata, "tokenizer.ggml.eos_token_id", len(tokens))
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token",
                                    True if pre is None else pre.add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        for name, wanted, token in (("bos", add_bos, bos), ("eos", add_eos, eos)):
            if wanted and token is None:
                raise TokenizerError(f"tokenizer.ggml.{name}_token_id", (
                    f"missing, but tokenizer.ggml.add_{name}_token asks for one"))
        if pre is None:
            scores = _per_token(metadata, "tokenizer.ggml.scores", len(tokens), float, 0.0)
            add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
            backend = _spm_backend(tokens, vocab, scores)
        else:
            merges = [str(m) for m in _required(metadata, "tokenizer.ggml.merges")]
            add_space_prefix = False
            backend = _bpe_backend(vocab, merges, pre)
        return cls(model=model, tokens=tokens, token_types=types, backend=backend, pre=pre_name,
                   bos_id=bos, eos_id=eos, eog_ids=eog, add_bos=add_bos, add_eos=add_eos,
                   add_space_prefix=add_space_prefix)

    def _build_pieces(self) -> list[bytes]:
        """Each token's bytes as llama.cpp's token_to_piece gives them with special=True."""
        pieces: list[bytes] = []
        if self.model == "llama":
            for text, kind in zip(self.tokens, self.token_types, strict=True):
                if kind == NORMAL:
                    pieces.append(text.replace("▁", " ").encode())
                elif kind == BYTE:
                    pieces.append(_byte_token_value(text))
                elif kind in (CONTROL, UNKNOWN, USER_DEFINED):
                    pieces.append(text.encode())
                else:
                    pieces.append(b"")
            return pieces
        to_byte = {char: b for b, char in _byte_level_alphabet().items()}
        for text, kind in zip(self.tokens, self.token_types, strict=True):
            if kind == NORMAL:
                # A character outside the byte alphabet (a malformed vocabulary) stays UTF-8.
                pieces.append(b"".join(bytes([to_byte[c]]) if c in to_byte else c.encode()
                                       for c in text))
            elif kind in (CONTROL, UNKNOWN, USER_DEFINED):
                pieces.append(text.encode())
            else:
                pieces.append(b"")
        return pieces

    # -- encoding -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (rows of the output layer)."""
        return len(self.tokens)

    def encode(self, text: str, *, add_special: bool = True,
               parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the vocabulary asks.

        ``parse_special`` recognises control tokens written in the text (``<start_of_turn>``);
        user-defined tokens are always recognised, as in llama.cpp.
        """
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)  # type: ignore[arg-type]
        matcher = self._all_specials if parse_special else self._user_defined
        previous_special = True
        for fragment in matcher.partition(text):
            if isinstance(fragment, int):
                ids.append(fragment)
                previous_special = True
                continue
            if self.add_space_prefix and previous_special:
                fragment = " " + fragment
            ids.extend(self._backend.encode(fragment, add_special_tokens=False).ids)
            previous_special = False
        if add_special and self.add_eos:
            ids.append(self.eos_id)  # type: ignore[arg-type]
        return ids

    # -- decoding -----------------------------------------------------------------------

    def _check(self, token: int) -> None:
        if not 0 <= token < len(self._pieces):
            raise TokenizerError("token", f"id {token} is outside the vocabulary "
                                          f"(0..{len(self._pieces) - 1})")

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes ``token`` stands for; control tokens are empty unless ``special``.

        Bytes, not text: a byte-fallback token holds part of a UTF-8 character.
        """
        self._check(token)
        if not special and self.token_types[token] in (CONTROL, UNKNOWN):
            return b""
        return self._pieces[token]

    def decode(self, ids: Iterable[int], *, special: bool = False) -> str:
        """The text of ``ids``: their pieces joined, as llama-server streams them.

        Bytes that form no valid UTF-8 become U+FFFD. Where the vocabulary adds a space
        prefix when encoding (Llama 2), decoding keeps it, as llama.cpp's pieces do.
        """
        return b"".join(self.piece(t, special=special) for t in ids).decode(errors="replace")

    def detokenizer(self, *, special: bool = False) -> Detokenizer:
        """A streaming decoder for one sequence's generated tokens."""
        return Detokenizer(self, special=special)

    def token_text(self, token: int) -> str:
        """The token's text as the vocabulary spells it (``▁Hello``, ``<bos>``)."""
        self._check(token)
        return self.tokens[token]

    @property
    def bos_text(self) -> str:
        """The BOS token's text (``<bos>``) for chat templates; "" without one."""
        return "" if self.bos_id is None else self.tokens[self.bos_id]

    @property
    def eos_text(self) -> str:
        """The EOS token's text (``<eos>``) for chat templates; "" without one."""
        return "" if self.eos_id is None else self.tokens[self.eos_id]

    def is_eog(self, token: int) -> bool:
        """True for a token that ends generation (EOS, end of turn, ...)."""
        return token in self.eog_ids


class Detokenizer:
    """Turns a stream of token ids into text pieces that never end inside a UTF-8 character.

    Bytes of a character split across tokens are held back until it is complete; bytes that
    can never form a character come out as U+FFFD, as a full decode would give them.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """The text that ``token`` completes (may be empty)."""
        return self._decoder.decode(self._tokenizer.piece(token, special=self._special))

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        return self._decoder.decode(b"", final=True)


def _byte_token_value(text: str) -> bytes:
    """``<0x0A>`` → ``b"\\n"``."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    raise TokenizerError("tokenizer.ggml.tokens", f"byte token {text!r} is not of the form <0xHH>")


def _spm_backend(tokens: Sequence[str], vocab: Mapping[str, int],
                 scores: Sequence[float]) -> Any:
    """A ``tokenizers`` BPE equal to llama.cpp's SentencePiece merge loop.

    llama.cpp merges, at each step, the adjacent pair whose concatenation is in the
    vocabulary with the best score. As merges: every split of a token into two tokens,
    ranked by the token's score (best first). Characters that are not tokens fall back to
    ``<0xHH>`` byte tokens.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers

    merges: list[tuple[str, str]] = []
    # Best score first (ties: lowest id), each token's splits left to right: the merges come
    # out ranked, with no list of sort keys beside them (Gemma has 513,000).
    for token in sorted(vocab.values(), key=lambda t: -scores[t]):
        text = tokens[token]
        merges.extend((text[:cut], text[cut:]) for cut in range(1, len(text))
                      if text[:cut] in vocab and text[cut:] in vocab)
    bpe = models.BPE(vocab=dict(vocab), merges=merges, byte_fallback=True)
    backend = HFTokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "▁")
    return backend


def _bpe_backend(vocab: Mapping[str, int], merges: Sequence[str], pre: PreTokenizer) -> Any:
    """A ``tokenizers`` byte-level BPE with the GGUF's merges and pre-tokenizer regex."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pairs: list[tuple[str, str]] = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: a merge's left part may start with a space
        if cut < 0:
            raise TokenizerError("tokenizer.ggml.merges", f"{merge!r} is not 'left right'")
        left, right = merge[:cut], merge[cut + 1:]
        # tokenizers refuses merges over unknown tokens; llama.cpp could never emit them.
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
    bpe = models.BPE(vocab=dict(vocab), merges=pairs, ignore_merges=pre.ignore_merges)
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pre.regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return backend
