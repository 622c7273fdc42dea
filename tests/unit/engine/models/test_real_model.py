"""The real Gemma 3 270M through velod's engine against llama.cpp's llama-server, greedy.

Ten prompts (plain text, code, numbers, Japanese, and chat conversations rendered by
llama-server's own template) go through velod's engine together — continuous batching, the
paged cache, prefill chunks, the window pool — and through llama-server one at a time, 64
greedy tokens each, past end-of-generation tokens. Prompt token ids come from llama-server,
so both runs start from the same ids.

* On a float32 copy of the file (``tests.assets.gemma3_f32_gguf``: every tensor dequantized by
  gguf.quants, which is what velod computes with) and a float32 KV cache in llama-server, the
  outputs must be equal token for token; the only accepted difference is at a step where
  llama.cpp's two best tokens are within 1e-2 in log-probability (a tie that summation order
  may break either way), and the test reports that margin.
* On the Q4_K_M file itself llama.cpp quantizes activations to 8 bits on the fly (and keeps
  an f16 KV cache), which moves its log-probabilities away from exact arithmetic. The test
  measures that error where both saw the same context (every step before the first
  difference): for each of the two best tokens (on either side) against every token in both
  top-8 lists, how far llama.cpp's difference of their log-probabilities is from velod's.
  Two tokens can only swap places where llama.cpp's margin between them is within that
  error, so each first divergence is bounded by the largest error measured (and that error
  by what phase 1 of issue 14 measured, ~0.5 per log-probability). The test reports where
  each divergence happens and at what margins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import assets
from velod.engine.models.sampling import SamplingParams
from velod.engine.runtime.engine import Engine, build_engine
from velod.engine.settings import EngineSettings
from velod.kernels import NumpyBackend

# The two llama-server runs (640 tokens each, the float32 one at ~1 GB read per token) and
# velod's own take minutes on a shared 2-core machine.
pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1200)]

TOKENS = 64
TIE = 1e-2  # llama.cpp's top-2 log-probability margin under which either token is right

PROMPTS: list[str | list[dict[str, str]]] = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which",
    "日本の首都は",
    [{"role": "user", "content": "Write a haiku about the ocean."}],
    [{"role": "user", "content": "What is 17 times 23?"}],
    [{"role": "user", "content": "Hi! Who are you?"},
     {"role": "assistant", "content": "I am a helpful assistant."},
     {"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]


TOP = 8  # log-probabilities compared per step


@dataclass
class Greedy:
    """One prompt's greedy continuation: tokens, and per step the chosen token's
    log-probability, the margin between the two best and the best ``TOP`` (id -> logprob)."""

    tokens: list[int]
    logprobs: list[float]
    margins: list[float]
    top: list[dict[int, float]]


def llama_cpp_greedy(server: assets.LlamaServer, ids: list[int]) -> Greedy:
    reply = server.post("/completion", {
        "prompt": ids, "n_predict": TOKENS, "temperature": 0, "n_probs": TOP,
        "return_tokens": True, "cache_prompt": False, "ignore_eos": True}, timeout=600)
    run = Greedy(reply["tokens"], [], [], [])
    for step in reply["completion_probabilities"]:
        top = step["top_logprobs"]
        run.logprobs.append(step["logprob"])
        run.margins.append(top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else 1e9)
        run.top.append({entry["id"]: entry["logprob"] for entry in top})
    return run


def pair_error(theirs: dict[int, float], ours: dict[int, float]) -> float:
    """How far llama.cpp's log-probability difference of two tokens is from velod's, at
    most, over the pairs that decide a greedy choice: either side's best two tokens against
    every token both list."""
    common = [t for t in theirs if t in ours]
    leaders = [t for t in (*list(theirs)[:2], *list(ours)[:2]) if t in ours and t in theirs]
    return max((abs((theirs[a] - theirs[b]) - (ours[a] - ours[b]))
                for a in leaders for b in common), default=0.0)


def prompt_ids(server: assets.LlamaServer) -> list[list[int]]:
    """Each prompt's token ids as llama.cpp makes them (chats through its own template)."""
    ids = []
    for prompt in PROMPTS:
        text = prompt if isinstance(prompt, str) else server.apply_template(prompt)
        ids.append(server.tokenize(text, add_special=True))
    return ids


def velod_engine(model: Path) -> Engine:
    settings = EngineSettings(None, model=str(model), dtype="float32", device="cpu",
                              kv_cache_bytes=256 << 20, block_size=16, max_batch_size=16,
                              max_tokens_per_step=512, language_model=True)
    return build_engine(settings, backend=NumpyBackend())


def velod_greedy(engine: Engine, prompts: list[list[int]]) -> list[Greedy]:
    """Every prompt through the engine at once, greedy, with log-probabilities."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=TOP)
    ids = [engine.submit(p, TOKENS, sampling=params) for p in prompts]
    runs = {seq_id: Greedy([], [], [], []) for seq_id in ids}
    while engine.has_work:
        for token in engine.step().sampled:
            run = runs[token.id]
            run.tokens.append(token.token)
            run.logprobs.append(float(token.logprob))
            (_, best), (_, second) = token.top[:2]
            run.margins.append(best - second)
            run.top.append(dict(token.top))
    return [runs[seq_id] for seq_id in ids]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@pytest.fixture(scope="module")
def engine(gemma_gguf: Path) -> Engine:
    return velod_engine(gemma_gguf)


def test_greedy_output_equals_llama_cpp_on_the_float32_weights(engine: Engine) -> None:
    with assets.llama_server(assets.gemma3_f32_gguf(), "--cache-type-k", "f32",
                             "--cache-type-v", "f32", "-np", "1", ctx=4096) as server:
        prompts = prompt_ids(server)
        theirs = [llama_cpp_greedy(server, ids) for ids in prompts]
    ours = velod_greedy(engine, prompts)
    report = []
    for prompt, ids, their, our in zip(PROMPTS, prompts, theirs, ours, strict=True):
        assert len(their.tokens) == len(our.tokens) == TOKENS
        first = first_difference(their.tokens, our.tokens)
        agreed = slice(None, first)
        report.append({
            "prompt": prompt if isinstance(prompt, str) else "chat", "prompt_tokens": len(ids),
            "first_difference": first,
            "llama_cpp_margin_there": None if first is None else their.margins[first],
            "smallest_margin_agreed": min(their.margins[agreed], default=None),
            "largest_logprob_deviation": float(np.max(np.abs(
                np.subtract(their.logprobs[agreed], our.logprobs[agreed])), initial=0.0))})
    print(json.dumps(report, ensure_ascii=False, indent=1))
    for entry in report:
        if entry["first_difference"] is not None:  # only a tie may go either way
            assert entry["llama_cpp_margin_there"] < TIE, entry
        assert entry["largest_logprob_deviation"] < 1e-2, entry
    assert sum(e["first_difference"] is None for e in report) >= 8, report


def test_on_the_q4_k_m_file_divergences_happen_only_within_llama_cpps_own_error(
        engine: Engine, gemma_gguf: Path) -> None:
    with assets.llama_server(gemma_gguf, "-np", "1", ctx=4096) as server:
        prompts = prompt_ids(server)
        theirs = [llama_cpp_greedy(server, ids) for ids in prompts]
    ours = velod_greedy(engine, prompts)
    report, error = [], 0.0
    for prompt, their, our in zip(PROMPTS, theirs, ours, strict=True):
        first = first_difference(their.tokens, our.tokens)
        agreed = range(TOKENS if first is None else first)
        error = max([error, *(pair_error(their.top[i], our.top[i]) for i in agreed)])
        entry: dict[str, Any] = {"prompt": prompt if isinstance(prompt, str) else "chat",
                                 "first_difference": first}
        if first is not None:
            entry |= {"llama_cpp_margin_there": their.margins[first],
                      "velod_margin_there": our.margins[first],
                      "pair_error_there": pair_error(their.top[first], our.top[first])}
        report.append(entry)
    print(json.dumps({"largest_pair_error_where_agreed": error, "prompts": report},
                     ensure_ascii=False, indent=1))
    # Phase 1 measured llama.cpp's log-probabilities on this file up to ~0.5 away from exact
    # arithmetic, so a pair's difference up to ~1.0 (1.01 here, 2026-11-29): much more would
    # be velod's error (which the float32 test above would show too).
    assert error < 1.5
    for entry in report:
        if entry["first_difference"] is not None:
            assert entry["llama_cpp_margin_there"] <= error, entry
    assert sum(e["first_difference"] is None for e in report) >= 3, report
