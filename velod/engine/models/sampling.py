"""Choosing the next token of many sequences at once from their logits (pure NumPy).

:class:`SamplingParams` holds one request's settings, validated with errors that name the
field; :class:`SamplerState` its per-request state (seeded generator, penalty window);
:func:`sample` picks one token per row of a ``[n, vocab]`` float32 logits array.

The order and meaning are llama.cpp's sampler chain (``common/sampling.cpp``): penalties
(repetition, frequency, presence over the last ``penalty_window`` tokens, prompt
included) → top-k → top-p → min-p → temperature → draw. Temperature 0 is greedy: the
highest penalized logit, ties to the lowest id. Top-k and top-p are taken on the
temperature-1 distribution (temperature comes last), as llama.cpp does. Only the few
candidates a row can still choose from are sorted: no full sort of the vocabulary.

The reported log-probability (``logprobs=True``) is the log-softmax of the model's raw
logits, before penalties, truncation and temperature: what llama-server reports by
default and what OpenAI's ``logprobs`` describe, the model's own belief in the token.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from velod.engine.core.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1000
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKENS = 256

# Candidates are found through column maxima of the row seen as [_COLUMN_ROWS, vocab/…]:
# a column whose maximum is below the k-th largest maximum cannot hold a top-k logit.
_COLUMN_ROWS = 128
# Beyond this many candidates a full sort of the row is as cheap.
_FULL_SORT_FRACTION = 8
# Top-p without top-k bins logits by their distance to the best: 4096 bins over 40 nats
# (further tokens share the last bin; each weighs under e^-40 of the best).
_TOP_P_BINS, _TOP_P_SPAN = 4096, 40.0
_TOP_P_HEAD = 64  # candidates tried first
# Logits further below the best count as this far in sums (e^-80: nothing, but not the
# slow underflow path of float32 exp).
_FAR = 80.0


Distribution = tuple[np.ndarray, np.ndarray]  # (token ids, weights), not normalised


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; every field validated on construction.

    Defaults are llama.cpp's (``llama-server``): temperature 0.8, top-k 40, top-p 0.95,
    min-p 0.05, no penalties over a 64-token window. 0 disables top-k and min-p, 1
    disables top-p and the repetition penalty.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_window: int = 64  # last N tokens (prompt included); -1: all; 0: no penalties
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int | None = None  # None: until an end-of-generation token or the context ends
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past the model's end-of-generation tokens
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        _check_number(self, "temperature", 0.0, None)
        _check_int(self, "top_k", 0, None)
        _check_number(self, "top_p", 0.0, 1.0, low_open=True)
        _check_number(self, "min_p", 0.0, 1.0)
        _check_number(self, "repetition_penalty", 0.0, None, low_open=True)
        _check_number(self, "presence_penalty", -2.0, 2.0)
        _check_number(self, "frequency_penalty", -2.0, 2.0)
        _check_int(self, "penalty_window", -1, None)
        if self.seed is not None:
            _check_int(self, "seed", 0, 2**64 - 1)
        if self.max_tokens is not None:
            _check_int(self, "max_tokens", 1, None)
        stop = _as_tuple(self, "stop", str)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings",
                                 MAX_STOP_STRINGS)
        for text in stop:
            if not 0 < len(text) <= MAX_STOP_LENGTH:
                raise InvalidRequest("stop", f"each stop string needs 1 to {MAX_STOP_LENGTH} "
                                             f"characters, not {len(text)}", MAX_STOP_LENGTH)
        object.__setattr__(self, "stop", stop)
        ids = _as_tuple(self, "stop_token_ids", int)
        if len(ids) > MAX_STOP_TOKENS or any(i < 0 for i in ids):
            raise InvalidRequest("stop_token_ids", f"up to {MAX_STOP_TOKENS} token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool) or not isinstance(self.logprobs, bool):
            name = "ignore_eos" if not isinstance(self.ignore_eos, bool) else "logprobs"
            raise InvalidRequest(name, "must be true or false")
        _check_int(self, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs=true")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplingParams:
        """From a request's options map; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        for key in options:
            if key not in known:
                raise InvalidRequest(key, "unknown sampling option; known: "
                                          + ", ".join(sorted(known)))
        return cls(**options)

    @property
    def greedy(self) -> bool:
        """True when the highest logit always wins (temperature 0)."""
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """True when some penalty can change a logit."""
        return self.penalty_window != 0 and (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0)

    def ends_generation(self, token: int, eog_ids: frozenset[int]) -> bool:
        """True when ``token`` ends this request: one of its stop tokens, or one of the
        model's end-of-generation tokens unless ``ignore_eos``."""
        return token in self.stop_token_ids or (not self.ignore_eos and token in eog_ids)

    def check_vocabulary(self, vocab_size: int) -> None:
        """InvalidRequest when a stop token id is outside the model's vocabulary."""
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise InvalidRequest("stop_token_ids", f"{token} is outside the vocabulary "
                                                       f"(0..{vocab_size - 1})", vocab_size)


def _check_number(params: SamplingParams, name: str, low: float, high: float | None,
                  low_open: bool = False) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(name, f"must be a finite number, not {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise InvalidRequest(name, f"{value!r} is outside {bounds}")
    object.__setattr__(params, name, float(value))


def _check_int(params: SamplingParams, name: str, low: int, high: int | None) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequest(name, f"must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        raise InvalidRequest(name, f"{value} is outside [{low}, {'inf' if high is None else high}]")
    object.__setattr__(params, name, int(value))


def _as_tuple(params: SamplingParams, name: str, kind: type) -> tuple[Any, ...]:
    value = getattr(params, name)
    if isinstance(value, (str, bytes)):
        value = (value,) if kind is str else value
    try:
        items = tuple(value)
    except TypeError:
        raise InvalidRequest(name, f"must be a list of {kind.__name__}") from None
    if any(isinstance(i, bool) or not isinstance(i, kind) for i in items):
        raise InvalidRequest(name, f"must be a list of {kind.__name__}")
    return items


class SamplerState:
    """One request's sampling state: its generator and the tokens penalties look at.

    Built from the params and the prompt (penalties count prompt tokens, as llama-server
    does); :func:`sample` records each chosen token.
    """

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        size = params.penalty_window
        self.window: deque[int] = deque(maxlen=None if size < 0 else size)
        self.counts: Counter[int] = Counter()
        if params.penalized:
            for token in prompt[-size:] if size > 0 else prompt:
                self.accept(int(token))

    def accept(self, token: int) -> None:
        """Record a chosen token in the penalty window."""
        if not self.params.penalized:
            return
        if self.window.maxlen is not None and len(self.window) == self.window.maxlen:
            old = self.window[0]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.window.append(token)
        self.counts[token] += 1


@dataclass
class SampleResult:
    """The chosen token of each row, with log-probabilities where the request asked."""

    tokens: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]; NaN where params.logprobs is off
    top_ids: list[np.ndarray | None]  # per row: the top_logprobs best ids, best first
    top_logprobs: list[np.ndarray | None]


class SamplingError(ValueError):
    """The logits cannot be sampled (wrong shape, NaN from the model)."""


def sample(logits: np.ndarray, states: Sequence[SamplerState]) -> SampleResult:
    """Pick a token for each row of ``logits`` ([n, vocab] float32) with its row's state.

    ``logits`` is only read. Each row's state draws from its own generator and records
    the chosen token, so the same seed gives the same tokens.
    """
    if logits.ndim != 2 or logits.shape[0] != len(states):
        raise SamplingError(f"logits of shape {logits.shape} for {len(states)} sequences")
    n, _ = logits.shape
    tokens = np.empty(n, dtype=np.int32)
    logprobs = np.full(n, np.nan, dtype=np.float32)
    top_ids: list[np.ndarray | None] = [None] * n
    top_values: list[np.ndarray | None] = [None] * n
    for i, state in enumerate(states):
        row, params = logits[i], state.params
        try:
            token = _choose(row, params, state)
        except SamplingError as error:
            raise SamplingError(f"row {i}: {error}") from None
        if math.isnan(row[token]):  # argmax stops at the first NaN
            raise SamplingError(f"row {i}: the logits hold NaN")
        tokens[i] = token
        state.accept(token)
        if params.logprobs:
            norm = _log_normalizer(row)
            logprobs[i] = row[token] - norm
            if params.top_logprobs:
                ids, values = _top_candidates(row, params.top_logprobs)
                top_ids[i], top_values[i] = ids, (values - norm).astype(np.float32)
    return SampleResult(tokens, logprobs, top_ids, top_values)


def _choose(row: np.ndarray, params: SamplingParams, state: SamplerState) -> int:
    """One row's token: greedy, or a draw from :func:`distribution`."""
    if params.greedy and not state.counts:
        return int(np.argmax(row))  # the first maximum: the lowest id wins a tie
    ids, weights = distribution(row, params, state)
    return int(ids[_draw(weights, state.rng)])


def distribution(row: np.ndarray, params: SamplingParams, state: SamplerState) -> Distribution:
    """The tokens ``row`` may still yield after the chain, with weights proportional to
    their probabilities (greedy: the one winner). Not normalised: callers divide by the sum.
    """
    vocab = row.shape[0]
    penalties = _penalty_arrays(state) if params.penalized else None
    extra = 0 if penalties is None else len(penalties[0])
    k = 1 if params.greedy else params.top_k
    if k == 0 or (k + extra) * _FULL_SORT_FRACTION >= vocab:
        return _full_row_distribution(row, params, penalties)
    ids, values = _top_candidates(row, k + extra)
    if penalties is not None:
        ids, values = _penalize_candidates(row, ids, penalties, params)
    return _truncate(ids[:k], values[:k], params)


def _full_row_distribution(row: np.ndarray, params: SamplingParams,
                           penalties: tuple[np.ndarray, np.ndarray] | None) -> Distribution:
    """Top-k disabled (or as large as the vocabulary): work on the whole row."""
    if penalties is not None:
        row = row.copy()
        seen, counts = penalties
        row[seen] = _apply_penalties(row[seen], counts, params)
    if params.greedy:
        return np.array([np.argmax(row)]), np.ones(1)
    if params.top_k and params.top_k < row.shape[0]:
        return _truncate(*_top_candidates(row, params.top_k), params)
    top = float(np.max(row))
    if math.isnan(top):
        raise SamplingError("the logits hold NaN")
    if params.top_p < 1.0:
        ids = _top_p_set(row, top, params.top_p)
        values = row[ids].astype(np.float64)
        best = values.max()
        if params.min_p > 0.0:
            kept = values >= best + math.log(params.min_p)
            ids, values = ids[kept], values[kept]
        return ids, np.exp((values - best) / params.temperature)
    if params.min_p > 0.0:
        ids = np.flatnonzero(row >= top + math.log(params.min_p))
        order = np.lexsort((ids, -row[ids]))
        return _truncate(ids[order], row[ids[order]], params)
    # Nothing truncates: the whole distribution at the temperature.
    return np.arange(row.shape[0]), np.exp((row.astype(np.float64) - top) / params.temperature)


def _top_p_set(row: np.ndarray, top: float, p: float) -> np.ndarray:
    """The ids of the shortest best-first prefix of ``row`` holding ``p`` of the softmax
    mass (ties to the lowest id), in no particular order, without sorting the row.

    When the best few do not hold the mass, the logits are binned by their distance to the
    best one; whole bins above the cut are in, and only the bin the cut falls in is sorted.
    """
    distance = top - row  # >= 0; -inf logits are at +inf
    weights = _weights(-distance)  # float32 terms, float64 sums
    goal = p * weights.sum(dtype=np.float64)
    # A language model's mass sits in a few tokens: try the head first.
    head, _ = _top_candidates(row, min(_TOP_P_HEAD, row.shape[0]))
    covered = np.cumsum(weights[head], dtype=np.float64)
    if covered[-1] >= goal:
        return head[:int(np.searchsorted(covered, goal)) + 1]
    bins = np.minimum(distance * (_TOP_P_BINS / _TOP_P_SPAN), _TOP_P_BINS - 1).astype(np.intp)
    cumulative = np.cumsum(np.bincount(bins, weights=weights, minlength=_TOP_P_BINS))
    cut = min(int(np.searchsorted(cumulative, goal)), _TOP_P_BINS - 1)
    inside = np.flatnonzero(bins < cut)
    edge = np.flatnonzero(bins == cut)
    edge = edge[np.lexsort((edge, -row[edge]))]
    before = cumulative[cut - 1] if cut else 0.0
    needed = int(np.searchsorted(before + np.cumsum(weights[edge], dtype=np.float64),
                                 goal)) + 1
    return np.concatenate([inside, edge[:needed]])


def _truncate(ids: np.ndarray, values: np.ndarray, params: SamplingParams) -> Distribution:
    """Top-p, min-p and temperature over the top-k candidates, sorted best first."""
    logits = values.astype(np.float64)
    if params.greedy:
        return ids[:1], np.ones(1)
    keep = len(ids)
    if params.top_p < 1.0:
        cumulative = np.cumsum(np.exp(logits - logits[0]))
        keep = min(keep, int(np.searchsorted(cumulative, params.top_p * cumulative[-1])) + 1)
    if params.min_p > 0.0:
        threshold = logits[0] + math.log(params.min_p)
        keep = min(keep, int(np.searchsorted(-logits, -threshold, side="right")))
    keep = max(keep, 1)
    return ids[:keep], np.exp((logits[:keep] - logits[0]) / params.temperature)


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to ``weights`` (float64, >= 0)."""
    cumulative = np.cumsum(weights)
    if not cumulative[-1] > 0.0:  # every candidate at -inf: nothing to weigh, take the best
        return 0
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, len(weights) - 1)


def _penalty_arrays(state: SamplerState) -> tuple[np.ndarray, np.ndarray] | None:
    if not state.counts:
        return None
    ids = np.fromiter(state.counts.keys(), dtype=np.int64, count=len(state.counts))
    counts = np.fromiter(state.counts.values(), dtype=np.float32, count=len(state.counts))
    return ids, counts


def _apply_penalties(values: np.ndarray, counts: np.ndarray,
                     params: SamplingParams) -> np.ndarray:
    """llama.cpp's penalties on the logits of tokens seen ``counts`` times (counts > 0)."""
    repeat = np.float32(params.repetition_penalty)
    # Dividing a negative logit would raise it: llama.cpp multiplies those instead.
    values = np.where(values <= 0, values * repeat, values / repeat)
    return (values - counts * np.float32(params.frequency_penalty)
            - np.float32(params.presence_penalty)).astype(np.float32)


def _penalize_candidates(row: np.ndarray, ids: np.ndarray,
                         penalties: tuple[np.ndarray, np.ndarray], params: SamplingParams
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The candidates and the penalized tokens, penalties applied, best first.

    ``ids`` holds the raw top ``k + len(penalized)``: a token outside them and not
    penalized has at least k unpenalized tokens above it, so the penalized top k is here.
    """
    seen, counts = penalties
    candidates = np.union1d(ids, seen)
    values = row[candidates]
    at = np.searchsorted(candidates, seen)
    values[at] = _apply_penalties(values[at], counts, params)
    order = np.lexsort((candidates, -values))
    return candidates[order], values[order]


def _top_candidates(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest logits of ``row`` and their ids, best first (ties: lowest id).

    Without sorting the row: the row is seen as a [_COLUMN_ROWS, columns] matrix; only
    columns whose maximum reaches the k-th largest column maximum can hold a top-k value.
    """
    vocab = row.shape[0]
    if k * _FULL_SORT_FRACTION >= vocab or vocab < _COLUMN_ROWS * 4:
        if np.isnan(row).any():
            raise SamplingError("the logits hold NaN")
        ids = np.arange(vocab)
        if k < vocab:
            threshold = np.partition(row, vocab - k)[vocab - k]
            ids = np.flatnonzero(row >= threshold)
    else:
        columns = vocab // _COLUMN_ROWS
        grid = row[: columns * _COLUMN_ROWS].reshape(_COLUMN_ROWS, columns)
        column_max = grid.max(axis=0)
        tail = np.arange(columns * _COLUMN_ROWS, vocab)  # the few that do not fill a row
        if np.isnan(column_max).any() or np.isnan(row[tail]).any():
            raise SamplingError("the logits hold NaN")
        kk = min(k, columns)
        picked = np.flatnonzero(column_max >= np.partition(column_max, columns - kk)[columns - kk])
        block = grid[:, picked]
        flat = block.ravel()
        threshold = np.partition(flat, flat.size - k)[flat.size - k] if flat.size > k else -np.inf
        r, c = np.nonzero(block >= threshold)
        ids = np.concatenate([r * columns + picked[c], tail])
    values = row[ids]
    order = np.lexsort((ids, -values))[:k]
    return ids[order], values[order]


def _log_normalizer(row: np.ndarray) -> float:
    """log(sum(exp(row))), computed stably in float32 with a float64 sum."""
    top = float(np.max(row))
    return top + math.log(float(_weights(row - top).sum(dtype=np.float64)))


def _weights(shifted: np.ndarray) -> np.ndarray:
    """exp(shifted) for logits minus the best one, those below -_FAR taken at -_FAR.

    float32 exp of -100 takes NumPy's slow underflow path, ten times slower than the
    rest; a token e^-80 below the best changes no sum it is added to.
    """
    clipped = np.maximum(shifted, np.float32(-_FAR))
    return np.exp(clipped, out=clipped)
