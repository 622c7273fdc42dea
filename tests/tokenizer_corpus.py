"""Strings on which velod's tokenizer must give llama.cpp's token ids.

Hand-picked cases (scripts, emoji, code, digits, whitespace runs, special-token text) plus
seeded random mixes of the hard pieces, so each vocabulary sees a few hundred strings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

_PROSE = [
    "Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "It's, I'm, you're, we've, they'll, she'd, IT'S, YOU'RE, WE'VE, THEY'LL, SHE'D",
    "don't won't can't shouldn't 'quoted' \"double\" `back`",
    "e.g. i.e. etc. Mr. Smith's dog; (parenthesised) [bracketed] {braced}",
    "ALL CAPS and MiXeD CaSe and lowercase",
    "Hyphen-ated words — em dash – en dash … ellipsis",
    "“curly quotes” ‘single curly’ «guillemets» „low quotes“",
    "A", "a", ".", "!", "?", "'", "'s", "''", "'''", "x'y", "'S'",
]
_DIGITS = [
    "0", "7", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
    "3.14159", "-42", "+1e-10", "1,000,000", "1 000 000", "0x1F2E", "0b1010", "2024-01-31",
    "12:34:56", "v1.2.3", "99%", "$19.99", "€5", "١٢٣ Arabic-Indic digits", "४२ Devanagari",
    "½ ¾ ² ³ ⅞", "①②③", "Ⅻ roman", "abc123def456", "a1b2c3",
]
_WHITESPACE = [
    "", " ", "  ", "   ", "    ", "        ", " x", "  x", "x ", "x  ", "x   y",
    "\t", "\t\t", "\tx", "x\t", "\t \t", "\n", "\n\n", "\n\n\n", "x\ny", "x\n\ny", "\n x",
    "x \n", " \n ", "\r\n", "\r", "x\r\ny", "\n\r", "\u00a0nbsp", "ideographic\u3000space",
    "line\u2028separator", "thin\u2009space", "\u200bzero width", "\ufeffbom", "a \t\n b",
    "trailing spaces   ", "   leading spaces", "mixed \t \n \r\n end", "\x0bvertical\x0c",
]
_SCRIPTS = [
    "日本語のテキスト", "中文文本测试", "한국어 텍스트", "Привет мир", "Ελληνικά γράμματα",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu",
    "Ünïcödé façade naïve coöperate", "e\u0301 combining vs é precomposed", "ﬁ ﬂ ligatures",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 fraktur", "𝟘𝟙𝟚 double-struck", "Ａｂｃ fullwidth", "ᚠᛇᚻ runes",
    "∀x∈ℝ: x²≥0 ⇒ √x²=|x|", "∑∫∂∇ ≤≥≠≈ ∞", "←↑→↓ ⟨⟩", "♠♣♥♦ ☃ ☂", "Iñtërnâtiônàlizætiøn",
    "Ǆǅǆ titlecase", "İstanbul ı dotless", "ß ẞ Straße", "ŉ ǰ special casing",
    "\u202eright-to-left override", "\u200f\u200eRTL LTR marks", "ἀρχὴ polytonic",
    "ⓐⓑⓒ circled", "😀", "🎉🎊", "👍🏽 thumbs", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags",
    "1️⃣ keycap", "❤️ heart", "🏳️‍🌈 rainbow", "emoji😀inside🎉words", "🤖🧠💡🚀",
    "\U0001f9d1\u200d\U0001f4bb technologist", "☕️ ☕ variation", "𓀀 hieroglyph", "\U0010ffff",
]
_CODE = [
    "def f(x):\n    return x**2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '{"key": "value", "n": [1, 2, 3], "nested": {"ok": true, "x": null}}',
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -E '^/root' && exit 0",
    "<div class=\"x\"><span>text</span></div>",
    "<table><tr><td>cell</td></tr></table>",
    "# Title\n\n- item *one*\n- item **two**\n\n```python\nprint('hi')\n```",
    "x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares",
    "const f = async (a, b) => { await g(a?.b ?? 0); };",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "if a != b && c >= d || e <= f { return !g; }",
    r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@example\.com$",
    "https://example.com/path?q=1&r=two#frag",
    "user.name+tag@example.co.uk",
    "C:\\Users\\Name\\file.txt",
    "    indented four\n        indented eight\n\t\ttab-indented",
    "==== ---- ____ **** //// \\\\\\\\ .... ,,,, ;;;; ::::",
    "!!!!!!!!!! ??????????? ~~~~~~~~",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababab",
    "Supercalifragilisticexpialidocious" * 3,
    "a" * 300,
    " " * 40 + "x",
    "\n" * 40 + "y",
]


def base_strings() -> list[str]:
    """The hand-picked strings (no special tokens)."""
    return [*_PROSE, *_DIGITS, *_WHITESPACE, *_SCRIPTS, *_CODE]


def special_strings(specials: Sequence[str]) -> list[str]:
    """Special-token text in context: alone, glued, spaced, doubled, cut short."""
    out: list[str] = []
    for text in specials:
        out += [text, f"x{text}y", f" {text} ", f"{text}\n", f"{text}{text}", text[:-1],
                f"<{text}>", f"Hello {text}world"]
    if len(specials) >= 2:
        a, b = specials[0], specials[-1]
        out += [f"{a}user\nHi there!{b}\n{a}model\n", f"{a}{b}{a}", f"{a} {b}"]
    return out


def mixed_strings(count: int, seed: int, specials: Sequence[str] = ()) -> list[str]:
    """``count`` seeded random mixes of the hard pieces (and of ``specials``)."""
    rng = random.Random(seed)
    pieces = [*base_strings(), *specials, " ", "  ", "\n", "\t", "'s", "123", "😀", "é", "中"]
    out = []
    for _ in range(count):
        parts = rng.choices(pieces, k=rng.randint(2, 6))
        glue = rng.choice(["", " ", "\n", ""])
        out.append(glue.join(p[: rng.randint(1, 40)] for p in parts))
    return out


def corpus(specials: Sequence[str], mixed: int = 120, seed: int = 14) -> list[str]:
    """Every string for one vocabulary, without repeats."""
    strings = [*base_strings(), *special_strings(specials), *mixed_strings(mixed, seed, specials)]
    return list(dict.fromkeys(strings))
