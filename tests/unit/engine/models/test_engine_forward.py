"""Real models through the engine: the paged engine's logits against the dense reference.

Tiny random-weight GGUFs of each architecture run through ``Engine`` itself — its scheduler,
block tables, prefix cache, preemption, chunked prefill and (for gemma3) the window pool —
and every sampled row's logits are compared with the independent dense forward of that
sequence's whole history (``dense_reference``). Every cache slot starts as NaN and every block
on a free list is overwritten with NaN before each step, so reading a slot outside a
sequence's context, or a block after it was released, shows up as NaN logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.engine.models.dense_reference import DenseModel
from tests.unit.engine.models.tiny_gguf import SPECS
from velod.engine.core.errors import InvalidRequest
from velod.engine.models import load_model
from velod.engine.models.sampling import SamplingParams
from velod.engine.runtime.engine import Engine, build_engine
from velod.engine.runtime.pool import PoolError
from velod.engine.settings import EngineSettings
from velod.kernels import NumpyBackend

TOLERANCE = 1e-4  # max |logit - reference| / max |reference logit|, per sampled row


class Recording:
    """The loaded model, keeping a copy of the logits of each step's sampled rows."""

    def __init__(self, model: Any) -> None:
        self.inner = model
        self.last: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def begin_step(self, token_ids, positions, sample_indices=None) -> None:
        self.inner.begin_step(token_ids, positions, sample_indices)

    def layer_attention(self, layer):
        return self.inner.layer_attention(layer)

    def layer_qkv(self, layer):
        return self.inner.layer_qkv(layer)

    def layer_output(self, layer, attention) -> None:
        self.inner.layer_output(layer, attention)

    def logits(self, sample_indices):
        out = self.inner.logits(sample_indices)
        self.last = np.array(out, copy=True)
        return out

    def sample(self, sample_indices):
        return self.logits(sample_indices).argmax(axis=-1).astype(np.int32)


def settings(path: Path, **changes: Any) -> EngineSettings:
    values = {"geometry": None, "model": str(path), "dtype": "float32", "device": "cpu",
              "kv_cache_bytes": 8 << 20, "block_size": 4, "max_batch_size": 16,
              "max_tokens_per_step": 256, "language_model": True} | changes
    return EngineSettings(**values)


def engine_for(path: Path, **changes: Any) -> Engine:
    engine = build_engine(settings(path, **changes), backend=NumpyBackend(),
                          model=Recording(load_model(str(path))))
    for array in (*engine.pool.keys, *engine.pool.values):
        array.fill(np.nan)
    return engine


def relative(got: np.ndarray, expected: np.ndarray) -> float:
    assert np.isfinite(got).all(), "NaN logits: a released block or an unused slot was read"
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@dataclass
class Run:
    """What a run through the engine saw."""

    worst: float = 0.0
    steps: int = 0
    rows: int = 0
    max_batch: int = 0
    prefill_chunks: int = 0
    preemptions: int = 0
    prefix_hits: int = 0
    outputs: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


def poison_free_blocks(engine: Engine) -> None:
    """NaN into every block nobody holds or caches: what a released block may hold next."""
    bm = engine.scheduler.block_manager
    free = np.array(bm.free_block_ids(), np.int64)
    window = bm.window_pool
    window_free = np.array(window.free_block_ids() if window else [], np.int64)
    for layer, windowed in enumerate(engine.pool.windowed):
        blocks = window_free if windowed else free
        if len(blocks):
            engine.pool.keys[layer][blocks] = np.nan
            engine.pool.values[layer][blocks] = np.nan


def run(engine: Engine, dense: DenseModel, prompts: list[list[int]], max_new: int,
        **submit: Any) -> Run:
    """Every prompt through the engine until all finish; each sampled row's logits against
    the dense forward of its sequence so far."""
    seen = Run()
    ids = {engine.submit(prompt, max_new, **submit): list(prompt) for prompt in prompts}
    history = {seq_id: list(prompt) for seq_id, prompt in ids.items()}
    while engine.has_work:
        batch = engine.schedule()
        if batch.is_empty:
            continue
        poison_free_blocks(engine)
        result = engine.execute(batch)
        logits = engine.model.last
        assert logits is not None and len(logits) == len(batch.sample_seq_ids)
        for row, seq_id in enumerate(batch.sample_seq_ids.tolist()):
            expected = dense.forward(history[seq_id])[-1]
            seen.worst = max(seen.worst, relative(logits[row], expected))
        seen.rows += len(batch.sample_seq_ids)
        seen.steps += 1
        seen.max_batch = max(seen.max_batch, batch.num_seqs)
        seen.prefill_chunks += batch.num_prefill
        seen.preemptions += len(batch.preempted)
        outcome = engine.complete(batch, result)
        for token in outcome.sampled:
            history[token.id].append(token.token)
        for request, _ in outcome.finished:
            seen.outputs[request.id] = request.output_token_ids
            seen.reasons[request.id] = request.reason
    for seq_id, prompt in ids.items():
        assert history[seq_id] == prompt + seen.outputs[seq_id]
    seen.prefix_hits = engine.scheduler.stats().prefix_hit_tokens
    return seen


def streams(count: int, length: int, seed: int, shared: int = 0) -> list[list[int]]:
    """``count`` random prompts of ``length`` tokens, the first ``shared`` common to all."""
    rng = np.random.default_rng(seed)
    common = rng.integers(0, 97, shared).tolist()
    return [common + rng.integers(0, 97, length - shared).tolist() for _ in range(count)]


# ------------------------------------------------------------------ logits against dense


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_one_sequence_through_the_engine_matches_the_dense_reference(tiny, arch):
    path, dense = tiny[arch]
    seen = run(engine_for(path), dense, streams(1, 19, seed=1), max_new=12)
    assert seen.worst < TOLERANCE
    assert seen.rows == 12 and seen.max_batch == 1


@pytest.mark.parametrize("arch", sorted(SPECS))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_sixteen_sequences_with_shared_prefixes_match_the_dense_reference(tiny, arch,
                                                                         prefix_caching):
    path, dense = tiny[arch]
    engine = engine_for(path, max_tokens_per_step=64)
    engine.scheduler.block_manager.enable_prefix_caching = prefix_caching
    prompts = streams(16, 14, seed=2, shared=9)
    first = run(engine, dense, prompts[:1], max_new=4)  # its prefix is cached when it ends
    seen = run(engine, dense, prompts, max_new=6)
    assert max(first.worst, seen.worst) < TOLERANCE
    assert seen.max_batch == 16
    assert seen.prefill_chunks > 16  # 64 tokens a step: the prompts came in chunks
    assert (seen.prefix_hits > 0) == prefix_caching


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_a_pool_too_small_for_everyone_preempts_and_stays_exact(tiny, arch):
    path, dense = tiny[arch]
    # Room for about 60 tokens of full-attention cache; six sequences want 6 x 36.
    engine = engine_for(path, kv_cache_bytes=_pool_bytes(path, 60), max_batch_size=6,
                        max_tokens_per_step=40)
    seen = run(engine, dense, streams(6, 20, seed=3, shared=8), max_new=16)
    assert seen.worst < TOLERANCE
    assert seen.preemptions > 0


def test_sliding_window_layers_past_their_window_free_their_blocks_and_stay_exact(tiny):
    # gemma3's tiny model: a 6-token window on layers 0-4; 40-token sequences run far past
    # it with blocks of 2 tokens, so each releases most of its window blocks on the way.
    path, dense = tiny["gemma3"]
    engine = engine_for(path, block_size=2, max_batch_size=3, max_tokens_per_step=16)
    pool = engine.scheduler.block_manager.window_pool
    assert pool is not None and pool.window == 6
    assert sum(engine.pool.windowed) == 5  # one global layer keeps the whole context
    held = []
    original = engine.complete

    def complete(batch, result):
        outcome = original(batch, result)
        for seq_id in engine.scheduler.running_ids():
            held.append(len(engine.scheduler.block_manager.window_block_table(seq_id)[1]))
        return outcome

    engine.complete = complete  # type: ignore[method-assign]
    seen = run(engine, dense, streams(3, 22, seed=4), max_new=18)
    assert seen.worst < TOLERANCE
    # A sequence holds its window and the chunk being computed, never its 40 tokens.
    assert max(held) <= pool.blocks_for_chunk(16) and max(held) < 40 // 2
    assert pool.num_used_blocks == 0


def test_a_tiny_window_pool_forces_preemption_and_stays_exact(tiny):
    path, dense = tiny["gemma3"]
    engine = engine_for(path, kv_cache_bytes=_pool_bytes(path, 200), max_batch_size=4,
                        max_tokens_per_step=24)
    seen = run(engine, dense, streams(4, 20, seed=5), max_new=14)
    assert seen.worst < TOLERANCE


def _pool_bytes(path: Path, full_tokens: int) -> int:
    """A KV budget of about ``full_tokens`` tokens of every layer (float32)."""
    model = load_model(str(path))
    per_token = model.layers * 2 * model.kv_heads * model.head_dim * 4
    return full_tokens * per_token


# ------------------------------------------------------------------ sampling in the step


def test_greedy_output_is_the_argmax_of_the_dense_logits(tiny):
    path, dense = tiny["qwen2"]
    prompt = streams(1, 10, seed=6)[0]
    seen = run(engine_for(path), dense, [prompt], max_new=8)
    (output,) = seen.outputs.values()
    history = list(prompt)
    for token in output:
        assert token == int(dense.forward(history)[-1].argmax())
        history.append(token)


def test_the_same_seed_gives_the_same_tokens_and_logprobs_are_the_dense_ones(tiny):
    path, dense = tiny["llama"]
    prompt = streams(1, 9, seed=7)[0]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42,
                            logprobs=True, top_logprobs=3)
    runs = []
    for _ in range(2):
        engine = engine_for(path)
        engine.submit(prompt, 10, sampling=params)
        history, logprobs = list(prompt), []
        while engine.has_work:
            outcome = engine.step()
            for token in outcome.sampled:
                expected = dense.forward(history)[-1]
                log_softmax = expected - np.log(np.exp(expected - expected.max()).sum()) \
                    - expected.max()
                assert token.logprob is not None
                assert math.isclose(token.logprob, log_softmax[token.token], abs_tol=1e-4)
                assert [t for t, _ in token.top] == np.argsort(-expected)[:3].tolist()
                history.append(token.token)
                logprobs.append(token.logprob)
        runs.append(history)
    assert runs[0] == runs[1]
    assert len(set(runs[0][len(prompt):])) > 2  # sampled, not a greedy loop


def test_a_stop_token_finishes_the_request_with_reason_stop(tiny):
    path, dense = tiny["qwen2"]
    prompt = streams(1, 8, seed=8)[0]
    greedy = run(engine_for(path), dense, [prompt], max_new=6)
    (output,) = greedy.outputs.values()
    stop_at = output[2]
    engine = engine_for(path)
    seen = run(engine, dense, [prompt], max_new=6,
               sampling=SamplingParams(temperature=0.0, stop_token_ids=(stop_at,)))
    (request_id, tokens), = seen.outputs.items()
    assert tokens == output[:output.index(stop_at) + 1]
    assert seen.reasons[request_id] == "stop"


def test_end_of_generation_tokens_stop_unless_ignored(tiny):
    path, dense = tiny["gemma3"]
    prompt = streams(1, 8, seed=9)[0]
    greedy = run(engine_for(path), dense, [prompt], max_new=5)
    (output,) = greedy.outputs.values()
    for ignore, expected in ((False, output[:1]), (True, output)):
        engine = engine_for(path)
        engine.eog_ids = frozenset({output[0]})
        seen = run(engine, dense, [prompt], max_new=5,
                   sampling=SamplingParams(temperature=0.0, ignore_eos=ignore))
        assert list(seen.outputs.values()) == [expected]


def test_sampling_options_are_checked_against_the_model(tiny):
    path, _ = tiny["llama"]
    engine = engine_for(path)
    with pytest.raises(InvalidRequest, match="stop_token_ids: 500 is outside the vocabulary"):
        engine.submit([1, 2, 3], 4, sampling=SamplingParams(stop_token_ids=(500,)))
    assert not engine.has_work


# ------------------------------------------------------------------ pool and status


def test_status_says_what_runs_and_how_the_pools_are_held(tiny):
    path, _ = tiny["gemma3"]
    status = engine_for(path).status()
    model = status["model"]
    assert model["architecture"] == "gemma3" and model["synthetic"] is False
    assert model["weights"]["dtype"] == "float32" and model["weights"]["bytes"] > 0
    assert model["path"] == str(path)
    assert status["geometry"]["sliding_window"] == 6
    window = status["pool"]["window"]
    assert window["layers"] == 5 and window["blocks"] > 0
    assert status["pool"]["bytes"] == (status["pool"]["blocks"] * status["pool"]["block_bytes"]
                                       + window["bytes"])


def test_a_budget_too_small_for_one_window_is_refused_with_the_figures(tiny):
    path, _ = tiny["gemma3"]
    with pytest.raises(PoolError, match=r"sliding-window blocks .* at least 2 and 5 are "
                       r"needed: raise engine.kv_cache"):
        build_engine(settings(path, kv_cache_bytes=4096, block_size=2),
                     backend=NumpyBackend())
