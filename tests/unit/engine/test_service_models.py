"""The engine service with language models: the configured model loaded at start in a worker
thread, the load / unload verbs, status, listeners, and a clear error (never a crash) for
every way a model cannot be loaded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_vocab import spm_metadata
from tests.unit.engine.models.tiny_gguf import SPECS, TinySpec, write_tiny
from velod.bus import Bus
from velod.component import Context
from velod.config import parse_config
from velod.engine.service import EngineService
from velod.errors import Busy, InvalidParams, NotFound, Unavailable


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    vocab = spm_metadata()
    paths = {arch: write_tiny(root / f"{arch}.gguf", spec, vocab=vocab)
             for arch, spec in SPECS.items()}
    data = paths["llama"].read_bytes()
    (root / "cut.gguf").write_bytes(data[:len(data) // 2])
    paths["cut"] = root / "cut.gguf"
    paths["mamba"] = write_tiny(root / "mamba.gguf", TinySpec("mamba", layers=1))
    paths["no-vocab"] = write_tiny(root / "no-vocab.gguf", SPECS["llama"])
    return paths


def config_for(model: str, **engine: Any) -> Any:
    return parse_config({"engine": {"model": model, "dtype": "float32", "device": "cpu",
                                    "kv_cache": "8MiB", "max_batch_size": 8,
                                    "max_tokens_per_step": 64, **engine}})


def service_for(model: str, tmp_path: Path, **engine: Any) -> tuple[EngineService, list]:
    bus = Bus()
    events: list = []
    bus.subscribe(["engine.*"], lambda event: events.append(event))
    ctx = Context(config=config_for(model, **engine), bus=bus, state_dir=tmp_path,
                  log=logging.getLogger("test"))
    return EngineService(ctx), events


@asynccontextmanager
async def running(model: str, tmp_path: Path,
                  **engine: Any) -> AsyncIterator[tuple[EngineService, list]]:
    """The service for ``model``, started, and the events it publishes; stopped on leaving."""
    service, events = service_for(model, tmp_path, **engine)
    await service.start()
    try:
        yield service, events
    finally:
        await service.stop()


async def loaded(service: EngineService) -> dict[str, Any]:
    """engine.status once no load is under way."""
    for _ in range(2000):
        report = service.report()
        if report["state"] != "loading":
            return report
        await asyncio.sleep(0.005)
    raise AssertionError("the model did not finish loading")


async def finish(service: EngineService, seq_id: int, events: list) -> dict[str, Any]:
    for _ in range(2000):
        for event in events:
            if event.topic == "engine.finished" and event.data["id"] == seq_id:
                return event.data
        await asyncio.sleep(0.005)
    raise AssertionError("the request did not finish")


def test_the_configured_model_loads_at_start_in_the_background_and_status_says_what_runs(
        models, tmp_path):
    async def scenario() -> None:
        # start() returns at once: the load runs in a worker thread
        async with running(str(models["gemma3"]), tmp_path) as (service, events):
            assert service.report()["state"] == "loading"
            report = await loaded(service)
            model = report["model"]
            assert report["state"] == "released" and service.state == "running"
            assert model["loaded"] is True and model["architecture"] == "gemma3"
            assert model["synthetic"] is False and model["chat_template"] == "gemma"
            assert model["weights"]["dtype"] == "float32" and model["weights"]["bytes"] > 0
            assert report["geometry"]["layers"] == 6 and report["geometry"]["sliding_window"] == 6
            reply = await service.submit([5, 7, 11, 13], 6)
            done = await finish(service, reply["id"], events)
            assert done["reason"] == "length" and len(done["output_token_ids"]) == 6
            after = service.report()
            assert after["model"]["architecture"] == "gemma3" and after["pool"]["allocated"]
            assert after["pool"]["window"]["layers"] == 5
            assert [e.topic for e in events].count("engine.model_loaded") == 1

    asyncio.run(scenario())


def test_a_request_during_the_load_waits_for_the_model(models, tmp_path):
    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path) as (service, events):
            reply = await service.submit([1, 2, 3], 3)
            assert (await finish(service, reply["id"], events))["reason"] == "length"

    asyncio.run(scenario())


def test_a_synthetic_preset_is_plainly_synthetic(tmp_path):
    service, _ = service_for("llama3.2-1b", tmp_path)
    asyncio.run(service.start())
    report = service.report()
    assert report["model"]["synthetic"] is True and "not a language model" in \
        report["model"]["kind"]
    assert report["state"] == "released"


@pytest.mark.parametrize(("which", "message"), [
    ("missing", "no such model file"),
    ("cut", "truncated or corrupt"),
    ("mamba", "'mamba' is not supported; supported: llama, qwen2, gemma3"),
    ("no-vocab", "tokenizer.ggml.model"),
])
def test_a_configured_model_that_cannot_load_degrades_the_component_with_the_reason(
        models, tmp_path, which, message):
    async def scenario() -> None:
        path = models.get(which, tmp_path / "absent.gguf")
        async with running(str(path), tmp_path) as (service, _):
            report = await loaded(service)
            assert service.state == "degraded" and message in service.error
            assert report["state"] == "no model" and message in report["error"]
            assert report["model"]["loaded"] is False
            with pytest.raises(Unavailable, match=message):
                await service.submit([1, 2, 3], 2)
            # Another model loads fine afterwards: nothing was left half-done.
            reply = await service.load(str(models["qwen2"]))
            assert reply["model"]["architecture"] == "qwen2" and reply["pool"]["allocated"]
            assert service.report()["error"] is None and service.state == "running"

    asyncio.run(scenario())


def test_not_enough_memory_for_weights_and_pool_is_refused_with_the_figures(models, tmp_path):
    async def scenario() -> None:
        service, _ = service_for(str(models["llama"]), tmp_path, kv_cache="64TiB")
        await service.start()
        await loaded(service)
        figures = (r"needs \d.* as float32 weights, 64\.0 TiB for the KV pool "
                   r"\(engine\.kv_cache\) .* only .* is available")
        assert service.state == "degraded"
        with pytest.raises(Unavailable, match=figures):
            await service.load()
        assert service.engine is None and service.served is None

    asyncio.run(scenario())


def test_load_switches_models_keeps_the_old_one_on_failure_and_unload_frees_it(models,
                                                                              tmp_path):
    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path) as (service, events):
            first = await service.load()
            assert first["model"]["architecture"] == "llama"
            other = await service.load(str(models["qwen2"]), chat_template="chatml")
            assert other["model"]["architecture"] == "qwen2"
            assert other["model"]["chat_template"] == "chatml"
            with pytest.raises(NotFound, match="no such model file"):
                await service.load(str(tmp_path / "absent.gguf"))
            with pytest.raises(InvalidParams, match="truncated or corrupt"):
                await service.load(str(models["cut"]))
            report = service.report()  # the model loaded before is still there, and healthy
            assert report["model"]["architecture"] == "qwen2" and report["error"] is None
            assert (await service.unload()) == {"unloaded": True, "model": str(models["qwen2"])}
            assert service.engine is None and service.report()["model"]["loaded"] is False
            with pytest.raises(Unavailable, match="velodctl engine load"):
                await service.submit([1, 2, 3], 2)
            await service.reconfigure(config_for(str(models["llama"]), idle_release="9s"))
            assert service.report()["state"] == "no model"  # a reload does not undo the unload
            back = await service.load("llama3.2-1b")  # a synthetic preset is a model too
            assert back["model"]["synthetic"] is True
            with pytest.raises(InvalidParams, match=r"model: is not a known preset .* did you "
                               r"mean .llama3.1-8b."):
                await service.load("llama3.1-8")
            reply = await service.submit(4, 2)
            await finish(service, reply["id"], events)

    asyncio.run(scenario())


def test_load_and_unload_wait_for_running_requests(models, tmp_path):
    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path) as (service, _):
            reply = await service.submit(list(range(1, 40)), 40)
            with pytest.raises(Busy):
                await service.load(str(models["qwen2"]))
            with pytest.raises(Busy):
                await service.unload()
            await service.abort(reply["id"])
            assert (await service.unload())["unloaded"] is True

    asyncio.run(scenario())


def test_the_idle_release_frees_the_pool_and_keeps_the_weights(models, tmp_path):
    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path,
                           idle_release="0.05s") as (service, events):
            reply = await service.submit([1, 2, 3], 2)
            await finish(service, reply["id"], events)
            served = service.served
            for _ in range(200):
                if service.engine is None:
                    break
                await asyncio.sleep(0.01)
            assert service.engine is None and service.served is served
            assert service.report()["model"]["loaded"] is True

    asyncio.run(scenario())


def test_a_reload_that_names_another_model_loads_it_and_one_that_keeps_it_does_not(
        models, tmp_path):
    async def scenario() -> None:
        async with running(str(models["qwen2"]), tmp_path) as (service, events):
            # Another model named while the first one still loads: that one is loaded next.
            await service.reconfigure(config_for(str(models["llama"])))
            report = await loaded(service)
            assert report["model"]["architecture"] == "llama" and service.state == "running"
            llama = service.served
            await service.reconfigure(config_for(str(models["llama"]), idle_release="9s"))
            assert service.served is llama  # nothing the model depends on changed
            await service.reconfigure(config_for(str(models["gemma3"])))
            report = await loaded(service)
            assert report["model"]["architecture"] == "gemma3"
            await service.reconfigure(config_for(str(models["gemma3"]), dtype="float16"))
            report = await loaded(service)  # its K/V are written in the cache's new type
            assert report["dtype"] == "float16" and report["model"]["architecture"] == "gemma3"
            loads = [e.data["model"] for e in events if e.topic == "engine.model_loaded"]
            assert loads == [str(models["llama"]), str(models["gemma3"]), str(models["gemma3"])]

    asyncio.run(scenario())


def test_a_bench_runs_on_a_language_model_with_exact_token_counts(models, tmp_path):
    async def scenario() -> None:
        from velod.engine.runtime.workload import Workload

        async with running(str(models["gemma3"]), tmp_path) as (service, _):
            result = await service.run_bench(Workload(requests=4, prompt=12, gen=5))
            assert result["exact_token_counts"] is True and result["model_name"] == "tiny-gemma3"
            with pytest.raises(InvalidParams, match="verify"):
                await service.run_bench(Workload(requests=1, prompt=4, gen=2, verify=1))

    asyncio.run(scenario())


def test_listeners_hear_each_token_and_the_end_and_a_failing_one_stops_nothing(models,
                                                                              tmp_path):
    from velod.engine.models.sampling import SamplingParams

    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path) as (service, events):
            heard: list[Any] = []
            ended: list[Any] = []
            params = SamplingParams(temperature=0.7, seed=3, logprobs=True)
            reply = await service.submit([4, 8, 15, 16], 7, sampling=params,
                                         on_token=heard.append, on_finish=ended.append)

            def broken(token: Any) -> None:
                raise RuntimeError("a listener that fails")

            other = await service.submit([23, 42], 5, on_token=broken)
            await finish(service, reply["id"], events)
            await finish(service, other["id"], events)
            (request,) = ended
            assert request.reason == "length"
            assert [t.token for t in heard] == request.output_token_ids
            assert all(t.id == reply["id"] and t.logprob is not None and t.logprob <= 0
                       for t in heard)
            long = await service.submit(list(range(1, 30)), 60, on_finish=ended.append)
            await service.abort(long["id"])
            assert ended[-1].id == long["id"] and ended[-1].reason == "aborted"

    asyncio.run(scenario())


def test_a_token_listener_that_says_stop_ends_its_request_and_frees_its_blocks(models,
                                                                              tmp_path):
    async def scenario() -> None:
        async with running(str(models["llama"]), tmp_path) as (service, events):
            heard: list[Any] = []
            ended: list[Any] = []

            def third_is_enough(token: Any) -> bool:
                heard.append(token)
                return len(heard) == 3

            reply = await service.submit([4, 8, 15], 50, on_token=third_is_enough,
                                         on_finish=ended.append)
            done = await finish(service, reply["id"], events)
            assert done["reason"] == "stop" and len(heard) == 3
            assert [r.reason for r in ended] == ["stop"]
            engine = service.engine
            assert engine is not None and not engine.has_work
            assert engine.scheduler.block_manager.utilization == 0.0

    asyncio.run(scenario())
