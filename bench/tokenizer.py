"""Benchmark the tokenizer on the real Gemma 3 270M vocabulary, beside llama-server's /tokenize.

Build time from the GGUF's metadata (merges derived from 262,144 scores), encode time for a
chat prompt of about 512 tokens and for 32 KiB of mixed text, and the streaming decoder's
cost per token. llama-server's /tokenize on the same texts runs in the same script (its
time includes the local HTTP round trip, so it is an upper bound on llama.cpp's own).

    python bench/tokenizer.py [--repeat 20]

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import machine, timed_ms
from tests import assets
from tests.tokenizer_corpus import base_strings
from velod.engine.models.chat import ChatTemplate
from velod.engine.models.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    gguf = assets.gemma3_gguf()
    start = time.perf_counter()
    metadata = assets.gguf_metadata(gguf)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    build_s = time.perf_counter() - start

    mixed = "\n".join(base_strings())
    long_text = (mixed * (32768 // len(mixed) + 1))[:32768]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": text}
             for i, text in enumerate(base_strings()[:40])]
    prompt = ChatTemplate.builtin("gemma").render(turns)
    texts = {"chat prompt": prompt, "32 KiB mixed text": long_text}

    results: dict[str, Any] = {}
    with assets.llama_server(gguf, "-np", "1", ctx=2048) as server:
        for name, text in texts.items():
            ids = tokenizer.encode(text)
            assert ids == server.tokenize(text), f"{name}: ids differ from llama.cpp"
            ours = timed_ms(lambda t=text: tokenizer.encode(t), args.repeat, digits=3)
            theirs = timed_ms(lambda t=text: server.tokenize(t), args.repeat, digits=3)
            results[name] = {"chars": len(text), "tokens": len(ids), "velod": ours,
                             "llama_server_http": theirs,
                             "velod_us_per_token": round(ours["best_ms"] * 1000 / len(ids), 3),
                             "ratio_to_llama_server": round(ours["best_ms"] / theirs["best_ms"],
                                                            3)}

    ids = tokenizer.encode(long_text, add_special=False)

    def stream() -> None:
        detokenizer = tokenizer.detokenizer()
        for token in ids:
            detokenizer.feed(token)
        detokenizer.flush()

    decode = timed_ms(stream, max(3, args.repeat // 4), digits=3)
    results["streaming decode"] = {"tokens": len(ids), **decode,
                                   "us_per_token": round(decode["best_ms"] * 1000 / len(ids), 3)}
    print(json.dumps({"machine": machine(), "vocab": tokenizer.vocab_size,
                      "metadata_read_s": round(read_s, 2), "build_s": round(build_s, 2),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
