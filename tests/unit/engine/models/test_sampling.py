"""Sampling: llama.cpp's chain checked against a slow reference that sorts the whole row."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from velod.engine.core.errors import InvalidRequest
from velod.engine.models.sampling import (
    SamplerState,
    SamplingError,
    SamplingParams,
    _top_candidates,
    distribution,
    sample,
)


def reference(row: np.ndarray, params: SamplingParams, history: Sequence[int]) -> dict[int, float]:
    """llama.cpp's chain written plainly: penalties, full sort, top-k, top-p, min-p, temp."""
    x = row.astype(np.float32).copy()
    window = params.penalty_window
    if params.penalized:
        seen = Counter(history if window < 0 else history[-window:] if window else [])
        for token, count in seen.items():
            value = x[token]
            value = value * np.float32(params.repetition_penalty) if value <= 0 else (
                value / np.float32(params.repetition_penalty))
            x[token] = (value - np.float32(count) * np.float32(params.frequency_penalty)
                        - np.float32(params.presence_penalty))
    order = np.lexsort((np.arange(len(x)), -x)).tolist()  # a full sort, ties to the lowest id
    if params.temperature == 0:
        return {order[0]: 1.0}
    if params.top_k:
        order = order[:params.top_k]
    values = np.array([x[i] for i in order], dtype=np.float64)
    if params.top_p < 1:
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        cumulative = np.cumsum(probs)
        keep = next((i + 1 for i, c in enumerate(cumulative) if c >= params.top_p), len(order))
        order, values = order[:keep], values[:keep]
    if params.min_p > 0:
        keep = int(np.sum(values >= values[0] + math.log(params.min_p)))
        order, values = order[:max(keep, 1)], values[:max(keep, 1)]
    weights = np.exp((values - values[0]) / params.temperature)
    return dict(zip(order, weights / weights.sum(), strict=True))


def ours(row: np.ndarray, params: SamplingParams, history: Sequence[int]) -> dict[int, float]:
    state = SamplerState(params, prompt=history)
    ids, weights = distribution(row, params, state)
    return dict(zip(ids.tolist(), (weights / weights.sum()).tolist(), strict=True))


def assert_same_distribution(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    tokens = sorted(a)
    np.testing.assert_allclose([b[t] for t in tokens], [a[t] for t in tokens],
                               rtol=1e-5, atol=1e-9)


def logits(vocab: int, seed: int, scale: float = 3.0, ties: bool = False) -> np.ndarray:
    row = np.random.default_rng(seed).standard_normal(vocab).astype(np.float32) * scale
    return np.round(row) if ties else row


CHAINS = [
    {},  # llama.cpp's defaults: top-k 40, top-p 0.95, min-p 0.05, temperature 0.8
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 0.7, "top_k": 0, "top_p": 0.9, "min_p": 0.0},
    {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "min_p": 0.1},
    {"temperature": 1.0, "top_k": 5, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 2.0, "top_k": 100, "top_p": 0.5, "min_p": 0.2},
    {"temperature": 0.5, "top_k": 0, "top_p": 0.3, "min_p": 0.3},
    {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.6},
    {"temperature": 0.0, "repetition_penalty": 1.5, "presence_penalty": -1.0},
    {"top_k": 0, "top_p": 0.8, "repetition_penalty": 0.7, "frequency_penalty": -0.5},
    {"top_k": 3, "penalty_window": -1, "presence_penalty": 2.0},
    {"top_k": 3, "penalty_window": 4, "presence_penalty": 2.0},
]


@pytest.mark.parametrize("chain", CHAINS, ids=[str(c) for c in CHAINS])
@pytest.mark.parametrize(("vocab", "ties"), [(300, False), (5000, False), (5000, True),
                                             (40_003, False), (262_144, True)])
def test_distribution_equals_the_plain_llama_cpp_chain(chain: dict[str, Any], vocab: int,
                                                       ties: bool) -> None:
    row = logits(vocab, seed=vocab, ties=ties)
    history = [int(i) for i in np.argsort(-row)[:30:3]] + [7, 7, 7, 11]
    params = SamplingParams(**chain)
    assert_same_distribution(reference(row, params, history), ours(row, params, history))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_on_a_flat_distribution_keeps_the_right_bulk_of_the_vocabulary(top_p: float) -> None:
    row = np.round(logits(262_144, seed=5, scale=0.5), 2)  # flat, with many ties
    params = SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    expected = reference(row, params, [])
    assert len(expected) > 50_000
    assert_same_distribution(expected, ours(row, params, []))


def test_greedy_takes_the_highest_logit_and_the_lowest_id_of_a_tie() -> None:
    row = np.zeros(1000, dtype=np.float32)
    row[[17, 5, 900]] = 3.0
    state = SamplerState(SamplingParams(temperature=0.0))
    assert sample(row[None, :], [state]).tokens.tolist() == [5]


def test_greedy_ignores_top_k_top_p_and_min_p() -> None:
    row = logits(2000, seed=1)
    params = SamplingParams(temperature=0.0, top_k=1000, top_p=0.1, min_p=0.9)
    assert sample(row[None, :], [SamplerState(params)]).tokens[0] == np.argmax(row)


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others() -> None:
    rows = np.stack([logits(5000, seed=s, scale=1.0) for s in range(8)])

    def run(seed: int) -> list[int]:
        states = [SamplerState(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                              seed=seed + i)) for i in range(8)]
        return [t for _ in range(5) for t in sample(rows, states).tokens.tolist()]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_draws_follow_the_distribution() -> None:
    row = np.log(np.array([0.5, 0.3, 0.2] + [1e-9] * 997, dtype=np.float32))
    state = SamplerState(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=7))
    counts = Counter(int(sample(row[None, :], [state]).tokens[0]) for _ in range(4000))
    assert set(counts) == {0, 1, 2}
    for token, p in ((0, 0.5), (1, 0.3), (2, 0.2)):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_each_row_of_a_batch_samples_as_it_would_alone() -> None:
    rows = np.stack([logits(3000, seed=s) for s in range(6)])
    chains = [CHAINS[i % len(CHAINS)] for i in range(6)]

    def states() -> list[SamplerState]:
        return [SamplerState(SamplingParams(**c, seed=100 + i), prompt=[1, 2, 3])
                for i, c in enumerate(chains)]

    batched = sample(rows, states()).tokens.tolist()
    alone = [int(sample(rows[i:i + 1], [s]).tokens[0]) for i, s in enumerate(states())]
    assert batched == alone


def test_penalties_count_prompt_tokens_and_sampled_ones_within_the_window() -> None:
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, penalty_window=3)
    state = SamplerState(params, prompt=[9, 8, 7, 6])
    assert dict(state.counts) == {8: 1, 7: 1, 6: 1}
    row = np.zeros(100, dtype=np.float32)
    row[[6, 50]] = [1.0, 0.5]  # 6 is penalized below 50
    assert sample(row[None, :], [state]).tokens[0] == 50
    assert dict(state.counts) == {7: 1, 6: 1, 50: 1}


def test_a_window_of_zero_turns_penalties_off() -> None:
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, penalty_window=0)
    state = SamplerState(params, prompt=[6])
    row = np.zeros(100, dtype=np.float32)
    row[6] = 1.0
    assert sample(row[None, :], [state]).tokens[0] == 6 and not state.counts


def test_logprobs_are_the_raw_log_softmax_and_nan_when_not_asked() -> None:
    rows = np.stack([logits(4000, seed=3), logits(4000, seed=4)])
    states = [SamplerState(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3,
                                          repetition_penalty=2.0), prompt=[5]),
              SamplerState(SamplingParams(temperature=0.0))]
    result = sample(rows, states)
    log_softmax = rows[0].astype(np.float64) - np.log(np.exp(rows[0].astype(np.float64)).sum())
    assert result.logprobs[0] == pytest.approx(log_softmax[result.tokens[0]], abs=1e-5)
    best = np.argsort(-rows[0])[:3]
    assert result.top_ids[0].tolist() == best.tolist()
    assert result.top_logprobs[0] == pytest.approx(log_softmax[best], abs=1e-5)
    assert math.isnan(result.logprobs[1]) and result.top_ids[1] is None


def test_nan_logits_are_an_error_naming_the_row() -> None:
    rows = np.stack([logits(5000, seed=1), logits(5000, seed=2)])
    rows[1, 4321] = np.nan
    for chain in ({"temperature": 0.0}, {}, {"top_k": 0}, {"top_k": 0, "top_p": 1.0}):
        states = [SamplerState(SamplingParams(**chain)) for _ in range(2)]
        with pytest.raises(SamplingError, match="row 1: the logits hold NaN"):
            sample(rows, states)


def test_logits_that_do_not_match_the_states_are_an_error() -> None:
    with pytest.raises(SamplingError, match=r"shape \(2, 10\) for 1 sequences"):
        sample(np.zeros((2, 10), np.float32), [SamplerState(SamplingParams())])


def test_a_row_of_minus_infinity_but_one_still_samples_that_one() -> None:
    row = np.full(1000, -np.inf, dtype=np.float32)
    row[123] = 0.0
    for chain in ({}, {"top_k": 0, "top_p": 1.0, "min_p": 0.0}, {"top_k": 0}):
        assert sample(row[None, :], [SamplerState(SamplingParams(**chain))]).tokens[0] == 123


@settings(max_examples=200, deadline=None)
@given(vocab=st.integers(1, 3000), k=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1),
       levels=st.integers(1, 50))
def test_top_candidates_equal_a_full_sort_even_with_many_ties(vocab: int, k: int, seed: int,
                                                              levels: int) -> None:
    k = min(k, vocab)
    row = np.random.default_rng(seed).integers(0, levels, vocab).astype(np.float32)
    ids, values = _top_candidates(row, k)
    expected = sorted(range(vocab), key=lambda i: (-row[i], i))[:k]
    assert ids.tolist() == expected
    assert values.tolist() == row[expected].tolist()


def test_top_candidates_on_a_full_size_vocabulary_with_ties() -> None:
    row = np.round(logits(262_144, seed=9, scale=2.0))
    ids, _ = _top_candidates(row, 500)
    assert ids.tolist() == np.lexsort((np.arange(row.size), -row))[:500].tolist()


@pytest.mark.parametrize(("options", "field", "message"), [
    ({"temperature": -0.1}, "temperature", r"-0.1 is outside \[0, inf\)"),
    ({"temperature": float("nan")}, "temperature", "must be a finite number"),
    ({"temperature": "hot"}, "temperature", "must be a finite number"),
    ({"top_k": -1}, "top_k", r"-1 is outside \[0, inf\]"),
    ({"top_k": 2.5}, "top_k", "must be an integer"),
    ({"top_p": 0.0}, "top_p", r"0.0 is outside \(0, 1\]"),
    ({"top_p": 1.5}, "top_p", r"1.5 is outside \(0, 1\]"),
    ({"min_p": 1.01}, "min_p", r"outside \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", r"outside \(0, inf\)"),
    ({"presence_penalty": 3.0}, "presence_penalty", r"outside \[-2, 2\]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", r"outside \[-2, 2\]"),
    ({"penalty_window": -2}, "penalty_window", r"outside \[-1, inf\]"),
    ({"seed": -1}, "seed", "outside"),
    ({"seed": True}, "seed", "must be an integer"),
    ({"max_tokens": 0}, "max_tokens", r"0 is outside \[1, inf\]"),
    ({"stop": [""]}, "stop", "1 to 1000 characters"),
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stop": [1]}, "stop", "must be a list of str"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "token ids >= 0"),
    ({"logprobs": 1}, "logprobs", "true or false"),
    ({"top_logprobs": 21}, "top_logprobs", r"outside \[0, 20\]"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ({"temprature": 1.0}, "temprature", "unknown sampling option; known: .*temperature"),
])
def test_invalid_options_are_errors_naming_the_field(options: dict[str, Any], field: str,
                                                     message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        SamplingParams.from_options(options)
    assert caught.value.field == field


def test_options_are_normalised() -> None:
    params = SamplingParams.from_options({"temperature": 1, "stop": "END", "stop_token_ids": [3]})
    assert params.temperature == 1.0 and isinstance(params.temperature, float)
    assert params.stop == ("END",) and params.stop_token_ids == (3,)


def test_stop_tokens_and_end_of_generation_tokens_end_a_request_unless_eos_is_ignored() -> None:
    eog = frozenset({1, 106})
    assert SamplingParams(stop_token_ids=(7,)).ends_generation(7, eog)
    assert SamplingParams().ends_generation(106, eog)
    assert not SamplingParams(ignore_eos=True).ends_generation(106, eog)
    assert not SamplingParams().ends_generation(5, eog)


def test_stop_token_outside_the_vocabulary_is_an_error() -> None:
    with pytest.raises(InvalidRequest, match="99 is outside the vocabulary"):
        SamplingParams(stop_token_ids=(99,)).check_vocabulary(50)
