"""The Ollama client against the fake Ollama server: shapes in, typed errors out."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from tests.fakes.fake_ollama import FakeOllama, serve, serve_app
from velod.tuner.backends.ollama import (
    OllamaBadResponse,
    OllamaClient,
    OllamaHTTPError,
    OllamaTimeout,
    OllamaUnreachable,
    normalize_host,
    resolve_url,
)

pytestmark = pytest.mark.asyncio

GIB = 1024**3


@pytest.mark.parametrize(("value", "url"), [
    ("0.0.0.0:11434", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    (":11500", "http://127.0.0.1:11500"),
    ("gpu-box", "http://gpu-box:11434"),
    ("gpu-box:8080", "http://gpu-box:8080"),
    ("http://gpu-box", "http://gpu-box:80"),
    ("https://gpu-box/ollama/", "https://gpu-box:443/ollama"),
    ("http://10.0.0.2:11434", "http://10.0.0.2:11434"),
    ("[::1]:9000", "http://[::1]:9000"),
    ("[::]:11434", "http://[::1]:11434"),
    ("  'localhost:1234' ", "http://localhost:1234"),
])
async def test_normalize_host_reads_addresses_like_ollama(value: str, url: str) -> None:
    assert normalize_host(value) == url


async def test_resolve_url_prefers_config_then_ollama_host_then_default() -> None:
    assert resolve_url("http://a:1", {"OLLAMA_HOST": "b:2"}) == "http://a:1"
    assert resolve_url("", {"OLLAMA_HOST": "0.0.0.0:2"}) == "http://127.0.0.1:2"
    assert resolve_url("", {}) == "http://127.0.0.1:11434"


async def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        normalize_host("ftp://x")


async def test_fetch_state_reads_version_models_geometry_and_loaded() -> None:
    env = {"FAKE_OLLAMA_VRAM": "24GiB", "OLLAMA_CONTEXT_LENGTH": "8192",
           "FAKE_OLLAMA_PRELOAD": "llama3.1:8b", "FAKE_OLLAMA_VERSION": "0.32.1"}
    fake = FakeOllama(env=env)
    async with serve(fake) as url, OllamaClient(url, timeout=5) as client:
        state = await client.fetch_state()
    assert state.version == "0.32.1"
    assert [m.name for m in state.models] == ["llama3.1:8b", "llama3.2:3b", "qwen2.5:7b"]
    llama = state.model("llama3.1:8b")
    assert llama is not None and llama.geometry is not None
    assert (llama.geometry.layers, llama.geometry.kv_heads) == (32, 8)
    assert llama.size == 4920753328 and llama.family == "llama"
    (loaded,) = state.loaded
    assert loaded.name == "llama3.1:8b" and loaded.context_length == 8192
    assert not loaded.spills_to_cpu and loaded.expires_at


async def test_spilling_configuration_shows_in_ps() -> None:
    env = {"FAKE_OLLAMA_VRAM": "24GiB", "OLLAMA_CONTEXT_LENGTH": "65536",
           "OLLAMA_NUM_PARALLEL": "4", "FAKE_OLLAMA_PRELOAD": "llama3.1:8b"}
    async with serve(FakeOllama(env=env)) as url, OllamaClient(url) as client:
        (loaded,) = await client.loaded()
    # 65536 x 4 tokens x 128 KiB/token (f16) = 32 GiB of KV alone: cannot fit 24 GiB.
    assert loaded.size > 32 * GIB
    assert loaded.spills_to_cpu and 0 < loaded.gpu_fraction < 1


async def test_unknown_architecture_is_kept_with_a_reason() -> None:
    models = [{"name": "odd:1b", "size": 10**9, "model_info": {"general.architecture": "mamba"}}]
    async with serve(FakeOllama(models, env={})) as url, OllamaClient(url) as client:
        state = await client.fetch_state()
    (odd,) = state.models
    assert odd.geometry is None and "mamba" in (odd.skip_reason or "")


async def test_variants_are_left_out_of_the_state() -> None:
    async with serve(FakeOllama(env={})) as url, OllamaClient(url) as client:
        await client.create("llama3.1:8b-velod", "llama3.1:8b", {"num_ctx": 8192})
        state = await client.fetch_state(skip=("-velod",))
        show = await client.show("llama3.1:8b-velod")
    assert "llama3.1:8b-velod" not in [m.name for m in state.models]
    assert "num_ctx" in show["parameters"] and "8192" in show["parameters"]


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OllamaClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(OllamaUnreachable, match="is ollama running"):
            await client.version()


async def test_slow_server_times_out() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_MODE": "slow", "FAKE_OLLAMA_DELAY": "2"})
    async with serve(fake) as url, OllamaClient(url, timeout=0.2) as client:
        with pytest.raises(OllamaTimeout, match=r"within 0\.2s"):
            await client.version()


async def test_http_500_carries_status_and_ollamas_message() -> None:
    async with serve(FakeOllama(env={"FAKE_OLLAMA_MODE": "fail"})) as url, \
            OllamaClient(url) as client:
        with pytest.raises(OllamaHTTPError, match="HTTP 500: fake failure") as info:
            await client.tags()
    assert info.value.status == 500


async def test_unknown_model_is_http_404() -> None:
    async with serve(FakeOllama(env={})) as url, OllamaClient(url) as client:
        with pytest.raises(OllamaHTTPError, match="not found") as info:
            await client.show("nope:1b")
    assert info.value.status == 404


async def test_html_instead_of_json_is_a_bad_response() -> None:
    async with serve(FakeOllama(env={"FAKE_OLLAMA_MODE": "garbage"})) as url, \
            OllamaClient(url) as client:
        with pytest.raises(OllamaBadResponse, match="non-JSON"):
            await client.ps()


@pytest.mark.parametrize("body", [[1, 2], {"models": "x"}, {"models": [1]}, {"versio": "1"},
                                  {"models": [{"name": "a", "size": "big", "size_vram": 0}]}])
async def test_wrong_shape_json_is_a_bad_response(body: object) -> None:
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body)

    app.router.add_get("/api/version", answer)
    app.router.add_get("/api/ps", answer)
    async with serve_app(app) as url, OllamaClient(url) as client:
        with pytest.raises(OllamaBadResponse):
            await client.version()
        with pytest.raises(OllamaBadResponse):
            await client.loaded()


async def test_generate_streams_and_updates_expiry() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_VRAM": "24GiB", "OLLAMA_KEEP_ALIVE": "1m"})
    async with serve(fake) as url, OllamaClient(url) as client:
        assert await client.ps() == []
        result = await client.request("POST", "/api/generate",
                                      {"model": "llama3.2:3b", "prompt": "hi", "stream": False})
        (entry,) = await client.ps()
    assert result["done"] is True and result["eval_count"] == 8
    assert entry["name"] == "llama3.2:3b" and entry["context_length"] == 32768
    assert entry["size"] == entry["size_vram"]


async def test_busy_request_moves_expires_at_forward_like_ollama() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_VRAM": "24GiB"})
    async with serve(fake) as url, OllamaClient(url) as client:
        await client.request("POST", "/_fake/busy", {"model": "llama3.2:3b"})
        first = (await client.ps())[0]["expires_at"]
        await asyncio.sleep(0.02)
        second = (await client.ps())[0]["expires_at"]
    assert second > first


async def test_busy_from_the_environment_holds_a_first_request() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_VRAM": "24GiB", "FAKE_OLLAMA_BUSY": "llama3.2:3b"})
    async with serve(fake) as url, OllamaClient(url) as client:
        first = (await client.ps())[0]["expires_at"]
        await asyncio.sleep(0.02)
        assert (await client.ps())[0]["expires_at"] > first


# --------------------------------------------------------------------------- bounded replies


async def test_an_endless_version_reply_is_refused_after_the_limit_not_read_to_the_end(
        ) -> None:
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(400):  # 400 MiB if velod read it all
                await resp.write(b"x" * 2**20)
                sent += 2**20
        except ConnectionError:
            pass
        return resp

    app = web.Application()
    app.router.add_get("/api/version", endless)
    async with serve_app(app) as url, OllamaClient(url, timeout=10) as client:
        with pytest.raises(OllamaBadResponse, match="longer than velod reads"):
            await client.version()
    assert sent < 64 * 2**20  # velod hung up long before the end


async def test_a_declared_length_above_the_limit_is_refused_before_reading() -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"[" + b"0," * (40 * 2**20) + b"0]",
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/tags", big)
    async with serve_app(app) as url, OllamaClient(url) as client:
        with pytest.raises(OllamaBadResponse, match="more than velod reads"):
            await client.tags()


async def test_a_huge_reply_from_the_fake_is_a_bad_response_for_every_endpoint() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_MODE": "huge", "FAKE_OLLAMA_HUGE_BYTES": str(2**26)})
    async with serve(fake) as url, OllamaClient(url, timeout=10) as client:
        for call in (client.version, client.tags, client.ps):
            with pytest.raises(OllamaBadResponse, match="velod reads"):
                await call()


async def test_a_long_final_chunk_within_the_limit_streams_whole() -> None:
    # aiohttp's own line reader gives up at 128 KiB; a long conversation's context is more.
    fake = FakeOllama(env={"FAKE_OLLAMA_VRAM": "24GiB"})
    fake.context_tokens = 200_000
    async with serve(fake) as url, OllamaClient(url) as client:
        chunks = [c async for c in client.generate_stream(
            {"model": "llama3.2:3b", "prompt": "hi", "options": {"num_predict": 3}})]
    assert chunks[-1]["done"] and len(chunks[-1]["context"]) == 200_000


async def test_a_streamed_line_over_the_limit_is_a_bad_response() -> None:
    fake = FakeOllama(env={"FAKE_OLLAMA_VRAM": "24GiB"})
    fake.context_tokens = 3_000_000  # ~23 MB on one line
    async with serve(fake) as url, OllamaClient(url) as client:
        with pytest.raises(OllamaBadResponse, match="streamed a line longer"):
            async for _ in client.generate_stream(
                    {"model": "llama3.2:3b", "prompt": "hi", "options": {"num_predict": 3}}):
                pass
