"""Benchmark arithmetic, the saved-results store, and the runner against the fake Ollama."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.fake_ollama import FakeOllama, serve
from velod.config import OllamaConfig
from velod.tuner.backends.ollama import OllamaClient, OllamaHTTPError, OllamaUnreachable
from velod.tuner.backends.ollama_backend import OllamaBackend
from velod.tuner.bench.runner import BenchRunner
from velod.tuner.bench.spec import (
    PROMPTS,
    BenchSpec,
    BenchSpecError,
    Sample,
    build_prompt,
    compare,
    differs,
    judge,
    prompt_text,
    repeat_figures,
    stats,
)
from velod.tuner.bench.store import BenchDamaged, BenchNotFound, BenchStore, new_id, status_of

# --------------------------------------------------------------------------- pure


def test_default_prompts_ship_with_velod_and_are_fixed() -> None:
    for kind in PROMPTS:
        assert len(prompt_text(kind).split()) > 20
    assert len(prompt_text("summary")) > 4 * len(prompt_text("chat"))  # the long document


def test_build_prompt_stretches_or_cuts_to_about_n_tokens_and_tags_it() -> None:
    assert len(build_prompt("chat", 500).split()) == 500
    assert len(build_prompt("summary", 7).split()) == 7
    tagged = build_prompt("code", None, tag="run-1")
    assert tagged.startswith("[run-1] ") and tagged.endswith(prompt_text("code"))


@pytest.mark.parametrize("field, value, words", [
    ("prompts", ("poem",), "prompt must be one of"),
    ("concurrency", (0,), "concurrency"), ("repeat", 0, "repeat"), ("gen", 0, "gen"),
    ("prompt_tokens", 0, "prompt_tokens"), ("timeout", 0.0, "timeout")])
def test_spec_refuses_out_of_range_fields(field: str, value: Any, words: str) -> None:
    with pytest.raises(BenchSpecError, match=words):
        BenchSpec(model="m", **{field: value})


def test_spec_counts_requests_with_warmups() -> None:
    spec = BenchSpec(model="m", prompts=("chat", "code"), concurrency=(1, 4), repeat=3)
    assert spec.requests == 2 * (1 + 3 * (1 + 4))


def sample(tokens: int, seconds: float, ttft: float = 0.1, total: float = 1.0) -> Sample:
    return Sample.from_final({"eval_count": tokens, "eval_duration": int(seconds * 1e9),
                              "prompt_eval_count": 50, "prompt_eval_duration": int(0.05e9),
                              "load_duration": int(2e9)}, ttft, total)


def test_repeat_figures_use_ollamas_counters_and_the_wall_clock() -> None:
    figures = repeat_figures([sample(100, 1.0), sample(100, 2.0)], wall_s=2.5)
    assert figures["gen_tps"] == pytest.approx((100 + 50) / 2)  # mean of per-request tok/s
    assert figures["prompt_tps"] == pytest.approx(1000)
    assert figures["aggregate_tps"] == pytest.approx(200 / 2.5)
    assert figures["total_s"] == 2.5 and figures["load_s"] == pytest.approx(2.0)


def test_a_request_without_tokens_has_no_speed() -> None:
    assert Sample.from_final({"done": True}, None, 0.1).gen_tps is None
    assert repeat_figures([Sample.from_final({}, None, 0.1)], 0.1)["gen_tps"] is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.1, max_value=1e4), min_size=1, max_size=20))
def test_stats_median_lies_within_the_spread(values: list[float]) -> None:
    s = stats([*values, None])
    assert s is not None and s["n"] == len(values)
    assert s["min"] <= s["median"] <= s["max"]
    assert s["median"] == pytest.approx(statistics.median(values))
    assert s["spread"] == pytest.approx((max(values) - min(values)) / 2)


def test_stats_of_nothing_is_none() -> None:
    assert stats([None, None]) is None


def result(*cases: tuple[str, int, list[float]]) -> dict[str, Any]:
    return {"cases": [{"prompt": p, "concurrency": c,
                       "metrics": {"gen_tps": stats(v), "ttft_s": stats([0.1, 0.1])}}
                      for p, c, v in cases]}


def test_compare_gives_ratio_and_whether_it_beats_the_spread() -> None:
    a = result(("chat", 1, [100, 102, 98]), ("chat", 2, [80, 81, 79]))
    b = result(("chat", 1, [150, 151, 149]), ("chat", 2, [80, 83, 79]))
    rows = {(r["concurrency"], r["metric"]): r for r in compare(a, b)}
    fast = rows[(1, "gen_tps")]
    assert fast["ratio"] == pytest.approx(1.5) and fast["significant"] and fast["b_better"]
    same = rows[(2, "gen_tps")]
    assert same["significant"] is False and same["b_better"] is None
    assert rows[(1, "ttft_s")]["ratio"] == pytest.approx(1.0)


def test_a_lower_time_is_better() -> None:
    a = {"cases": [{"prompt": "chat", "concurrency": 1,
                    "metrics": {"ttft_s": stats([0.5, 0.51])}}]}
    b = {"cases": [{"prompt": "chat", "concurrency": 1,
                    "metrics": {"ttft_s": stats([0.2, 0.21])}}]}
    (row,) = compare(a, b)
    assert row["b_better"] is True and row["spread_known"]


def test_one_repeat_has_no_spread_so_no_side_is_called_better_or_worse() -> None:
    a = result(("chat", 1, [100.0]))
    b = result(("chat", 1, [150.0, 151.0, 149.0]))
    row = next(r for r in compare(a, b) if r["metric"] == "gen_tps")
    assert row["ratio"] == pytest.approx(1.5)
    assert row["significant"] is None and row["b_better"] is None
    assert not row["spread_known"] and row["a_spread"] is None


def test_differs_needs_both_sides() -> None:
    assert differs(None, stats([1.0])) is None


@pytest.mark.parametrize("after, slower, faster", [
    ([80, 81, 79], True, False), ([98, 99, 97], False, False), ([120, 121, 119], False, True)])
def test_judge_calls_a_change_slower_or_faster_only_beyond_the_noise(
        after: list[float], slower: bool, faster: bool) -> None:
    verdict = judge(stats([100, 101, 99]), stats(after), tolerance=0.05)
    assert (verdict.slower, verdict.faster) == (slower, faster)
    assert "tok/s" in verdict.message


def test_judge_uses_the_spread_when_it_is_larger_than_the_tolerance() -> None:
    noisy = judge(stats([100, 130, 70]), stats([85, 86, 84]), tolerance=0.05)
    assert not noisy.slower  # 15% slower, but the runs scattered by 30%


def test_judge_never_calls_a_missing_measurement_slower() -> None:
    assert not judge(None, stats([1.0]), 0.05).slower


# --------------------------------------------------------------------------- store


def test_store_saves_lists_and_resolves_ids(tmp_path: Path) -> None:
    store = BenchStore(tmp_path)
    ids = [new_id(1_800_000_000 + i) for i in range(3)]
    for i, run_id in enumerate(ids):
        store.save({"id": run_id, "time": i, "spec": {"model": "m", "purpose": "manual"},
                    "complete": True, "cases": []})
    assert store.ids() == ids
    assert [s["id"] for s in store.summaries()[0]] == ids[::-1]
    assert store.resolve("last") == ids[-1] and store.resolve("last~2") == ids[0]
    assert store.load(ids[1])["time"] == 1
    with pytest.raises(BenchNotFound, match="matches 3"):
        store.resolve(ids[0][:8])
    with pytest.raises(BenchNotFound, match="not a benchmark ID"):
        store.path("../../etc/passwd")
    with pytest.raises(BenchNotFound, match="no saved benchmark"):
        store.resolve("nothing")


# --------------------------------------------------------------------------- runner


@contextlib.asynccontextmanager
async def ollama_at(url: str) -> AsyncIterator[OllamaBackend]:
    backend = OllamaBackend(OllamaConfig(url=url))
    try:
        yield backend
    finally:
        await backend.close()


@pytest.mark.asyncio
async def test_runner_measures_streaming_answers_of_the_fake() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_TOKEN_DELAY": "0.002", "FAKE_OLLAMA_VRAM": "24GiB"})
    async with serve(fake) as url, ollama_at(url) as backend:
        progress: list[dict[str, Any]] = []
        spec = BenchSpec(model="llama3.2:3b", concurrency=(1, 3), repeat=2, gen=5)
        out = await BenchRunner(backend, spec, "t", progress.append).run()
    assert out["complete"] and out["error"] is None
    assert len(fake.generations) == spec.requests == 1 + 2 * 4
    one, three = out["cases"]
    assert [len(s) for s in three["samples"]] == [3, 3]
    speed = 1.25 / 0.002  # on the GPU, flash attention on by default in the fake
    assert one["metrics"]["gen_tps"]["median"] == pytest.approx(speed)
    assert 0 < one["metrics"]["ttft_s"]["median"] < one["metrics"]["total_s"]["median"]
    assert progress[-1]["phase"] == "done" and progress[-1]["done"] == spec.requests


@pytest.mark.asyncio
async def test_generate_stream_yields_tokens_as_they_are_made() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_TOKEN_DELAY": "0.05"})
    async with serve(fake) as url, OllamaClient(url) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        arrivals = []
        async for chunk in client.generate_stream({"model": "llama3.2:3b", "prompt": "hi",
                                                   "options": {"num_predict": 4}}):
            arrivals.append((loop.time() - t0, chunk.get("done")))
    assert [done for _, done in arrivals] == [False] * 4 + [True]
    assert arrivals[0][0] < arrivals[-1][0] - 0.1  # the first token came well before the end


@pytest.mark.asyncio
async def test_runner_reports_an_unknown_model_and_a_dead_server() -> None:
    async with serve(FakeOllama(env={})) as url, ollama_at(url) as backend:
        out = await BenchRunner(backend, BenchSpec(model="nope:1b", gen=2), "t").run()
    assert out["error_kind"] == "not_found" and not out["complete"]
    with pytest.raises(OllamaHTTPError):
        async with serve(FakeOllama(env={})) as url, OllamaClient(url) as client:
            async for _ in client.generate_stream({"model": "nope:1b", "prompt": "x"}):
                pass
    async with ollama_at("http://127.0.0.1:9") as backend:
        out = await BenchRunner(backend, BenchSpec(model="m", gen=2), "t").run()
        assert out["error_kind"] == "unreachable" and "partial results kept" in out["error"]
        with pytest.raises(OllamaUnreachable):
            async for _ in backend.client.generate_stream({"model": "m", "prompt": "x"}):
                pass


@pytest.mark.asyncio
async def test_runner_keeps_what_it_measured_when_time_runs_out() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_TOKEN_DELAY": "0.01", "FAKE_OLLAMA_VRAM": "24GiB"})
    async with serve(fake) as url, ollama_at(url) as backend:
        spec = BenchSpec(model="llama3.2:3b", repeat=50, gen=5, timeout=0.5)
        out = await BenchRunner(backend, spec, "t").run()
    assert out["error_kind"] == "timeout" and "within 0.5s" in out["error"]
    assert 1 <= out["cases"][0]["repeats"] < 50


@pytest.mark.parametrize("damage", [
    "{not json", "[]", '{"id": "x", "spec": {}, "cases": [{"prompt": "chat"}]}',
    '{"id": "x", "spec": {}, "cases": [{"prompt": "chat", "concurrency": 1, "repeats": 1, '
    '"metrics": {"gen_tps": {"median": "fast"}}}]}',
    '{"id": "x", "spec": [], "cases": []}', '{"id": "x", "spec": {}, "cases": [], '
    '"warmups": [{"prompt": "chat"}]}', "[" * 100_000])
def test_a_damaged_result_file_is_named_and_passed_over(tmp_path: Path, damage: str) -> None:
    store = BenchStore(tmp_path)
    good, bad = new_id(1_800_000_000), new_id(1_800_000_001)
    store.save({"id": good, "time": 0, "spec": {"model": "m"}, "complete": True, "cases": []})
    store.directory.joinpath(f"{bad}.json").write_text(damage)
    results, damaged = store.summaries()
    assert [r["id"] for r in results] == [good] and damaged == [bad]
    with pytest.raises(BenchDamaged, match=bad):
        store.load(bad)


def test_a_result_says_whether_it_was_complete_interrupted_or_partial() -> None:
    assert status_of({"complete": True}) == "complete"
    assert status_of({"complete": False, "error_kind": "interrupted"}) == "interrupted"
    assert status_of({"complete": False, "error_kind": "timeout"}) == "partial"
