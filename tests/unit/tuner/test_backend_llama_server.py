"""llama-server's client, planner and backend: against the real server where it answers."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests import assets
from tests.fakes.fake_ollama import serve_app
from velod.config import LlamaServerConfig, TunerConfig
from velod.hardware.snapshot import Cpu, Memory, OsInfo, Snapshot
from velod.model.gguf_header import read_geometry
from velod.tuner.backends.base import ServerBadResponse, ServerHTTPError, ServerUnreachable
from velod.tuner.backends.llama_server import (
    LlamaServerClient,
    LlamaServerState,
    error_detail,
    parse_metrics,
)
from velod.tuner.backends.llama_server_backend import LlamaServerBackend, sample_from_timings
from velod.tuner.backends.llama_server_planner import plan
from velod.tuner.dropin import Effective
from velod.tuner.planner import Policy, what_if_snapshot
from velod.tuner.state import ModelInfo

GIB = 1024**3
TRAINED = 4096  # the tiny model's context_length


@pytest.fixture(scope="module")
def tiny_server(tiny_llm_gguf: Path) -> Iterator[assets.LlamaServer]:
    with assets.llama_server(tiny_llm_gguf, "-np", "3", "--metrics", "--no-warmup",
                             ctx=3000) as server:
        yield server


@pytest_asyncio.fixture
async def backend(tiny_server: assets.LlamaServer) -> AsyncIterator[LlamaServerBackend]:
    b = LlamaServerBackend(LlamaServerConfig(url=tiny_server.url, request_timeout=5.0),
                           "llama-server")
    yield b
    await b.close()


def served(path: Path) -> ModelInfo:
    return ModelInfo(path.name, None, os.path.getsize(path), read_geometry(path))


def cpu_machine(ram: int = 24 * GIB) -> Snapshot:
    return Snapshot(time=0, gpus=(), cpu=Cpu("x", 2, 2), memory=Memory(ram, ram // 2),
                    os=OsInfo("Linux", "6", "x86_64"))


# --------------------------------------------------------------------------- the client


@pytest.mark.asyncio
async def test_a_poll_reads_slots_context_model_and_metrics(
        backend: LlamaServerBackend, tiny_llm_gguf: Path) -> None:
    state = await backend.fetch_state(TunerConfig())
    # -c 3000 -np 3: 3072 cells padded, 1024 a slot.
    assert state.total_slots == 3 and state.slot_context == 1024
    assert [s.n_ctx for s in state.slots or []] == [1024] * 3
    assert state.model_path == str(tiny_llm_gguf)
    (model,) = state.models
    assert model.geometry is not None and model.geometry.layers == 2
    assert model.size == os.path.getsize(tiny_llm_gguf) and model.source == "installed"
    assert state.metrics is not None and "llamacpp:tokens_predicted_total" in state.metrics
    assert not state.busy and state.version


@pytest.mark.asyncio
async def test_a_request_moves_the_activity_marker(backend: LlamaServerBackend) -> None:
    before = await backend.fetch_state(TunerConfig())
    await backend.bench_request("tiny", "hello there", 4)
    after = await backend.fetch_state(TunerConfig())
    assert backend.activity(before)[0] != backend.activity(after)[0]


@pytest.mark.asyncio
async def test_a_streamed_request_is_timed_by_the_servers_own_timings(
        backend: LlamaServerBackend) -> None:
    sample = await backend.bench_request("tiny", "[t1] the quick brown fox", 12)
    assert sample.eval_count == 12 and sample.eval_s > 0 and sample.prompt_count > 0
    assert sample.ttft_s is not None and 0 < sample.ttft_s <= sample.total_s
    assert sample.gen_tps == pytest.approx(12 / sample.eval_s)


@pytest.mark.asyncio
async def test_nothing_listening_is_unreachable_with_the_address() -> None:
    client = LlamaServerClient("http://127.0.0.1:9", timeout=2.0)
    try:
        with pytest.raises(ServerUnreachable, match=re.escape(
                "cannot connect to llama-server at http://127.0.0.1:9")):
            await client.fetch_state()
        with pytest.raises(ServerUnreachable):
            async for _ in client.completion_stream({"prompt": "x"}):
                pass
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_an_error_status_with_a_body_that_is_not_utf8_is_a_clear_http_error() -> None:
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=500, body=b"\xff\xfe broken \xc3")

    app = web.Application()
    app.router.add_post("/completion", refuse)
    async with serve_app(app) as url:
        client = LlamaServerClient(url, timeout=5.0)
        try:
            with pytest.raises(ServerHTTPError, match=r"HTTP 500: .*broken") as info:
                async for _ in client.completion_stream({"prompt": "x"}):
                    pass
            assert info.value.status == 500
        finally:
            await client.close()


def test_answers_of_the_wrong_shape_are_named() -> None:
    assert parse_metrics("# HELP x\nllamacpp:a 3\nbroken line\nllamacpp:b 1.5e2\n") == {
        "llamacpp:a": 3.0, "llamacpp:b": 150.0}
    assert error_detail('{"error": {"code": 503, "message": "Loading model"}}') == \
        "Loading model"
    assert error_detail("<html>") == "<html>"
    with pytest.raises(ServerBadResponse, match="lacks id/n_ctx"):
        from velod.tuner.backends.llama_server import parse_slot
        parse_slot({"id": 0})


def test_timings_become_a_sample_in_seconds() -> None:
    s = sample_from_timings({"predicted_n": 48, "predicted_ms": 500.0, "prompt_n": 7,
                             "prompt_ms": 70.0}, 0.1, 0.7)
    assert (s.eval_count, s.eval_s, s.prompt_count, s.prompt_s) == (48, 0.5, 7, 0.07)
    assert s.gen_tps == 96.0 and s.prompt_tps == pytest.approx(100.0)


# --------------------------------------------------------------------------- the planner


def test_a_cpu_plan_keeps_four_slots_of_the_trained_context(tiny_llm_gguf: Path) -> None:
    p = plan(cpu_machine(), LlamaServerState("b1", [served(tiny_llm_gguf)]), Policy())
    values = {n: r.value for n, r in p.server.items()}
    assert values == {"LLAMA_ARG_CTX_SIZE": str(4 * TRAINED), "LLAMA_ARG_N_PARALLEL": "4",
                      "LLAMA_ARG_FLASH_ATTN": "auto", "LLAMA_ARG_CACHE_TYPE_K": "f16",
                      "LLAMA_ARG_CACHE_TYPE_V": "f16"}
    assert p.cpu_only and p.ram is not None and p.ram.fits and p.kind == "llama-server"


@pytest.mark.real_model
def test_gemma3_on_a_gpu_plans_the_windowed_cache_and_all_layers(gemma_gguf: Path) -> None:
    p = plan(what_if_snapshot(8 * GIB, 1, 64 * GIB),
             LlamaServerState("b1", [served(gemma_gguf)]), Policy())
    model = p.models[gemma_gguf.name]
    assert (model.context, model.parallel, model.fully_on_gpu) == (32768, 2, True)
    # Per slot, 3 full layers x 32768 cells + 15 windowed x 1024 cells, 1 KiB each (f16).
    assert model.kv_cache == 2 * (3 * 32768 + 15 * 1024) * 1024
    assert p.server["LLAMA_ARG_CTX_SIZE"].value == "65536"
    assert p.server["LLAMA_ARG_N_GPU_LAYERS"].value == "all"


def test_a_model_too_large_for_the_gpu_is_partly_offloaded(tiny_llm_gguf: Path) -> None:
    big = ModelInfo("big", None, 12 * GIB, read_geometry(tiny_llm_gguf))
    p = plan(what_if_snapshot(8 * GIB, 1, 64 * GIB), LlamaServerState("b1", [big]), Policy())
    layers = p.server["LLAMA_ARG_N_GPU_LAYERS"].value
    assert layers.isdigit() and int(layers) < 3
    assert not p.fits and any("on the CPU (slow)" in n for n in p.notes)


def test_a_quantized_cache_turns_flash_attention_on(tiny_llm_gguf: Path) -> None:
    p = plan(what_if_snapshot(8 * GIB, 1, 64 * GIB),
             LlamaServerState("b1", [served(tiny_llm_gguf)]), Policy(profile="long-context"))
    assert p.server["LLAMA_ARG_CACHE_TYPE_V"].value == "q8_0"
    assert p.server["LLAMA_ARG_FLASH_ATTN"].value == "on"


def test_pins_and_command_line_flags_shape_the_plan(tiny_llm_gguf: Path) -> None:
    policy = Policy(pin={"LLAMA_ARG_N_PARALLEL": "2", "LLAMA_ARG_THREADS": "2"},
                    locked={"LLAMA_ARG_CTX_SIZE": ("2048", "`-c 2048` on ExecStart")})
    p = plan(cpu_machine(), LlamaServerState("b1", [served(tiny_llm_gguf)]), policy)
    assert p.models[tiny_llm_gguf.name].context == 1024  # 2048 over the pinned 2 slots
    assert p.server["LLAMA_ARG_N_PARALLEL"].pinned
    assert p.server["LLAMA_ARG_CTX_SIZE"].locked == "`-c 2048` on ExecStart"
    env = p.environment()
    assert "LLAMA_ARG_CTX_SIZE" not in env and env["LLAMA_ARG_THREADS"] == "2"
    assert "LLAMA_ARG_CTX_SIZE" not in p.changes({})


def test_without_a_readable_model_nothing_is_planned() -> None:
    unreadable = ModelInfo("m.gguf", None, 0, None, skip_reason="cannot read the served model")
    p = plan(cpu_machine(), LlamaServerState("b1", [unreadable]), Policy())
    assert p.server == {} and p.skipped == {"m.gguf": "cannot read the served model"}
    assert any("no model to plan for" in n for n in p.notes)


# --------------------------------------------------------------------------- the backend


def test_the_units_command_line_locks_the_settings_velod_plans(tmp_path: Path) -> None:
    b = LlamaServerBackend(LlamaServerConfig(url="http://127.0.0.1:9"), "llama-server")
    effective = Effective({}, {}, {}, exec_start=["/usr/bin/llama-server", "-m", "x.gguf",
                                                  "-c", "4096", "--port", "8080"])
    policy = b.policy(TunerConfig(profile="throughput"), effective)
    assert policy.locked == {"LLAMA_ARG_CTX_SIZE": (
        "4096", "`-c 4096` on the ExecStart= line of llama-server.service overrides "
        "LLAMA_ARG_CTX_SIZE")}
    assert policy.profile == "throughput"
    asyncio.run(b.close())


def test_after_a_restart_props_must_show_the_planned_slots(tiny_llm_gguf: Path) -> None:
    b = LlamaServerBackend(LlamaServerConfig(url="http://127.0.0.1:9"), "llama-server")
    p = plan(cpu_machine(), LlamaServerState("b1", [served(tiny_llm_gguf)]), Policy())
    expected = b.expectations(p)
    assert expected == {"slots": 4, "slot_context": TRAINED}
    ok = b.verify(LlamaServerState("b1", total_slots=4, slot_context=TRAINED), expected)
    assert ok is not None and ok.ok
    bad = b.verify(LlamaServerState("b1", total_slots=2, slot_context=8192), expected)
    assert bad is not None and not bad.ok
    assert "runs 2 slots, not 4 and 8192 tokens per slot, not 4096" in bad.message
    assert b.verify(LlamaServerState(None, reachable=False), expected) is None
    asyncio.run(b.close())


def test_what_if_uses_the_served_gguf_then_the_catalog(tiny_llm_gguf: Path) -> None:
    b = LlamaServerBackend(LlamaServerConfig(url="http://127.0.0.1:9"), "llama-server")
    state = LlamaServerState("b1", [served(tiny_llm_gguf)], model_path=str(tiny_llm_gguf))
    what = b.what_if_state([tiny_llm_gguf.stem, "llama3.1:8b", "mystery"], state)
    sources: dict[str, Any] = {m.name: m.source for m in what.models}
    assert sources == {tiny_llm_gguf.name: "installed", "llama3.1:8b": "catalog",
                       "mystery": "none"}
    asyncio.run(b.close())
