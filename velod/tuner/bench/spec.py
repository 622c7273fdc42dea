"""Benchmark arithmetic: what a run asks for, per-request figures, medians, spreads, comparisons.

Pure: no I/O (the fixed prompts are package data read by ``prompt_text``). One *case* is one
prompt at one concurrency level; it is measured ``repeat`` times after a warm-up, and each
metric is summarised over the repeats as a median with its spread (half the range), so that
two results can say whether a difference is larger than run-to-run noise.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

PROMPTS = ("chat", "summary", "code")
MAX_CONCURRENCY = 64
MAX_REPEAT = 50
MAX_GEN = 8192
MAX_PROMPT_TOKENS = 131072

# (key, label, unit, higher is better)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("gen_tps", "generation", "tok/s", True),
    ("prompt_tps", "prompt", "tok/s", True),
    ("ttft_s", "time to first token", "s", False),
    ("total_s", "total time", "s", False),
    ("aggregate_tps", "aggregate generation", "tok/s", True),
    ("load_s", "load time", "s", False),
)


class BenchSpecError(ValueError):
    """A benchmark request that cannot run as asked; the message names the field."""


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: one model, prompts x concurrency levels, ``repeat`` times each."""

    model: str
    prompts: tuple[str, ...] = ("chat",)
    concurrency: tuple[int, ...] = (1,)
    repeat: int = 3
    gen: int = 128
    prompt_tokens: int | None = None
    timeout: float = 600.0
    purpose: str = "manual"

    def __post_init__(self) -> None:
        if not self.model:
            raise BenchSpecError("model must not be empty")
        unknown = [p for p in self.prompts if p not in PROMPTS]
        if not self.prompts or unknown:
            raise BenchSpecError(f"prompt must be one of {', '.join(PROMPTS)}"
                                 + (f", not {unknown[0]!r}" if unknown else ""))
        if not self.concurrency or not all(1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise BenchSpecError(f"concurrency levels must be between 1 and {MAX_CONCURRENCY}")
        if not 1 <= self.repeat <= MAX_REPEAT:
            raise BenchSpecError(f"repeat must be between 1 and {MAX_REPEAT}")
        if not 1 <= self.gen <= MAX_GEN:
            raise BenchSpecError(f"gen must be between 1 and {MAX_GEN}")
        if self.prompt_tokens is not None and not 1 <= self.prompt_tokens <= MAX_PROMPT_TOKENS:
            raise BenchSpecError(f"prompt_tokens must be between 1 and {MAX_PROMPT_TOKENS}")
        if self.timeout <= 0:
            raise BenchSpecError("timeout must be greater than 0")

    @property
    def requests(self) -> int:
        """Requests a full run sends, warm-ups included (one per prompt)."""
        return len(self.prompts) * (1 + self.repeat * sum(self.concurrency))

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prompts": list(self.prompts),
                "concurrency": list(self.concurrency), "repeat": self.repeat, "gen": self.gen,
                "prompt_tokens": self.prompt_tokens, "timeout": self.timeout,
                "purpose": self.purpose}


@cache
def prompt_text(kind: str) -> str:
    """The fixed text of a default prompt (shipped as ``velod/ollama/prompts/<kind>.txt``)."""
    if kind not in PROMPTS:
        raise BenchSpecError(f"unknown prompt {kind!r} (one of {', '.join(PROMPTS)})")
    path = resources.files("velod.tuner.bench") / "prompts" / f"{kind}.txt"
    return path.read_text("utf-8").strip()


def build_prompt(kind: str, tokens: int | None, tag: str = "") -> str:
    """The prompt to send: the fixed text, or its words repeated/cut to about ``tokens``.

    ``tag`` goes first so that Ollama's prompt cache cannot reuse an earlier request's
    prompt (that would measure the cache, not prompt processing). Words stand in for tokens
    (English runs ~1.3 tokens a word; the result records Ollama's own count).
    """
    text = prompt_text(kind)
    if tokens is not None:
        words = text.split()
        text = " ".join(words[i % len(words)] for i in range(max(1, tokens)))
    return f"[{tag}] {text}" if tag else text


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One request's figures: Ollama's counters plus the client's clock."""

    ttft_s: float | None  # client side: request sent -> first streamed token
    total_s: float  # client side: request sent -> final chunk
    eval_count: int
    eval_s: float
    prompt_count: int
    prompt_s: float
    load_s: float

    @classmethod
    def from_final(cls, final: dict[str, Any], ttft_s: float | None, total_s: float) -> Sample:
        """Build from Ollama's final chunk (durations in nanoseconds)."""
        def count(key: str) -> int:
            value = final.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(ttft_s=ttft_s, total_s=total_s, eval_count=count("eval_count"),
                   eval_s=count("eval_duration") / 1e9, prompt_count=count("prompt_eval_count"),
                   prompt_s=count("prompt_eval_duration") / 1e9,
                   load_s=count("load_duration") / 1e9)

    @property
    def gen_tps(self) -> float | None:
        return self.eval_count / self.eval_s if self.eval_count and self.eval_s > 0 else None

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_count / self.prompt_s if self.prompt_count and self.prompt_s > 0 \
            else None

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "total_s": self.total_s, "eval_count": self.eval_count,
                "eval_s": self.eval_s, "prompt_count": self.prompt_count,
                "prompt_s": self.prompt_s, "load_s": self.load_s}


def _mean(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return sum(real) / len(real) if real else None


def repeat_figures(samples: list[Sample], wall_s: float) -> dict[str, float | None]:
    """One repeat of one case (``samples`` ran concurrently, ``wall_s`` from first send to
    last answer): per-request figures averaged, aggregate tokens/s over the wall time."""
    tokens = sum(s.eval_count for s in samples)
    return {"gen_tps": _mean([s.gen_tps for s in samples]),
            "prompt_tps": _mean([s.prompt_tps for s in samples]),
            "ttft_s": _mean([s.ttft_s for s in samples]),
            "total_s": wall_s,
            "aggregate_tps": tokens / wall_s if wall_s > 0 and tokens else None,
            "load_s": max((s.load_s for s in samples), default=0.0)}


def stats(values: list[float | None]) -> dict[str, Any] | None:
    """Median, min, max and spread (half the range) of the known values; None if none."""
    real = sorted(v for v in values if v is not None)
    if not real:
        return None
    return {"median": statistics.median(real), "min": real[0], "max": real[-1],
            "spread": (real[-1] - real[0]) / 2, "n": len(real)}


def summarize(repeats: list[dict[str, float | None]]) -> dict[str, Any]:
    """Each metric's stats over the repeats of one case."""
    return {key: stats([r.get(key) for r in repeats]) for key, *_ in METRICS}


@dataclass
class Case:
    """One prompt at one concurrency level, as measured so far."""

    prompt: str
    concurrency: int
    repeats: list[dict[str, float | None]] = field(default_factory=list)
    samples: list[list[dict[str, Any]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "concurrency": self.concurrency,
                "repeats": len(self.repeats), "metrics": summarize(self.repeats),
                "runs": self.repeats, "samples": self.samples}


# --------------------------------------------------------------------------- comparing


def case_key(case: dict[str, Any]) -> tuple[str, int]:
    return (case["prompt"], case["concurrency"])


def spread_known(s: dict[str, Any] | None) -> bool:
    """A spread means something only over two repeats or more (one run has no spread)."""
    return s is not None and isinstance(s.get("n"), int) and s["n"] >= 2


def differs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """True when two medians differ by more than the two spreads together; None when that
    cannot be told (a figure is missing, or one side was measured once)."""
    if a is None or b is None or not spread_known(a) or not spread_known(b):
        return None
    return abs(b["median"] - a["median"]) > a["spread"] + b["spread"]


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case and metric: A's and B's medians, B/A, and whether it beats the noise
    (``significant`` None: the spread is unknown, so no side is called better)."""
    rows = []
    b_cases = {case_key(c): c for c in b.get("cases", [])}
    for case in a.get("cases", []):
        other = b_cases.get(case_key(case))
        if other is None:
            continue
        for key, label, unit, higher in METRICS:
            sa, sb = case["metrics"].get(key), other["metrics"].get(key)
            if sa is None and sb is None:
                continue
            ratio = (sb["median"] / sa["median"] if sa and sb and sa["median"] else None)
            significant = differs(sa, sb)
            better = None
            if significant and ratio is not None:
                better = (ratio > 1) == higher
            rows.append({"prompt": case["prompt"], "concurrency": case["concurrency"],
                         "metric": key, "label": label, "unit": unit,
                         "a": sa["median"] if sa else None, "b": sb["median"] if sb else None,
                         "a_spread": sa["spread"] if spread_known(sa) else None,
                         "b_spread": sb["spread"] if spread_known(sb) else None,
                         "spread_known": spread_known(sa) and spread_known(sb),
                         "ratio": ratio, "significant": significant, "b_better": better})
    return rows


@dataclass(frozen=True)
class Verdict:
    """Whether ``after`` is slower than ``before`` beyond the noise, and why."""

    slower: bool
    faster: bool
    ratio: float | None
    message: str


def judge(before: dict[str, Any] | None, after: dict[str, Any] | None,
          tolerance: float) -> Verdict:
    """Compare two generation tok/s stats. A change is slower (or faster) only when the
    medians differ by more than ``tolerance`` of ``before`` *and* by more than the two
    spreads together; missing figures are never called slower."""
    if before is None or after is None:
        return Verdict(False, False, None, "no generation speed measured; kept")
    ratio = after["median"] / before["median"] if before["median"] else None
    margin = max(tolerance * before["median"], before["spread"] + after["spread"])
    diff = after["median"] - before["median"]
    text = (f"{before['median']:.1f} -> {after['median']:.1f} tok/s"
            + (f" (x{ratio:.3f})" if ratio is not None else "")
            + f", noise margin {margin:.1f} tok/s")
    if diff < -margin:
        return Verdict(True, False, ratio, f"slower: {text}")
    if diff > margin:
        return Verdict(False, True, ratio, f"faster: {text}")
    return Verdict(False, False, ratio, f"same within noise: {text}")
