"""The engine service with language models: loading in a worker thread, the load / unload
verbs, status, and a clear error (never a crash) for every way a model cannot be loaded."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.unit.engine.models.tiny_gguf import SPECS, TinySpec, write_tiny
from velod.bus import Bus
from velod.component import Context
from velod.config import parse_config
from velod.engine.service import EngineService
from velod.errors import Busy, InvalidParams, Unavailable


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {arch: write_tiny(root / f"{arch}.gguf", spec) for arch, spec in SPECS.items()}
    data = paths["llama"].read_bytes()
    (root / "cut.gguf").write_bytes(data[:len(data) // 2])
    paths["cut"] = root / "cut.gguf"
    paths["mamba"] = write_tiny(root / "mamba.gguf", TinySpec("mamba", layers=1))
    return paths


def service_for(model: str, tmp_path: Path, **engine: Any) -> tuple[EngineService, list]:
    config = parse_config({"engine": {"model": model, "dtype": "float32", "device": "cpu",
                                      "kv_cache": "8MiB", "max_batch_size": 8,
                                      "max_tokens_per_step": 64, **engine}})
    bus = Bus()
    events: list = []
    bus.subscribe(["engine.*"], lambda event: events.append(event))
    ctx = Context(config=config, bus=bus, state_dir=tmp_path, log=logging.getLogger("test"))
    return EngineService(ctx), events


async def finish(service: EngineService, seq_id: int, events: list) -> dict[str, Any]:
    for _ in range(2000):
        for event in events:
            if event.topic == "engine.finished" and event.data["id"] == seq_id:
                return event.data
        await asyncio.sleep(0.005)
    raise AssertionError("the request did not finish")


def test_a_model_loads_on_first_use_and_status_says_what_runs(models, tmp_path):
    async def scenario() -> None:
        service, events = service_for(str(models["gemma3"]), tmp_path)
        await service.start()
        before = service.report()
        assert before["model"] == {"name": str(models["gemma3"]), "synthetic": False,
                                   "loaded": False, "kind": before["model"]["kind"]}
        assert before["pool"]["allocated"] is False
        reply = await service.submit([5, 7, 11, 13], 6)
        done = await finish(service, reply["id"], events)
        assert done["reason"] == "length" and len(done["output_token_ids"]) == 6
        after = service.report()
        model = after["model"]
        assert model["architecture"] == "gemma3" and model["synthetic"] is False
        assert model["weights"]["dtype"] == "float32" and model["weights"]["bytes"] > 0
        assert model["quantization"] is None or isinstance(model["quantization"], str)
        assert after["geometry"]["layers"] == 6 and after["geometry"]["sliding_window"] == 6
        assert after["pool"]["window"]["layers"] == 5
        await service.stop()

    asyncio.run(scenario())


def test_a_synthetic_preset_is_plainly_synthetic(tmp_path):
    service, _ = service_for("llama3.2-1b", tmp_path)
    asyncio.run(service.start())
    model = service.report()["model"]
    assert model["synthetic"] is True and "not a language model" in model["kind"]


@pytest.mark.parametrize(("which", "message"), [
    ("missing", "no such model file"),
    ("cut", "truncated or corrupt"),
    ("mamba", "'mamba' is not supported; supported: llama, qwen2, gemma3"),
])
def test_a_model_that_cannot_load_is_a_clear_error_and_the_service_carries_on(
        models, tmp_path, which, message):
    async def scenario() -> None:
        path = models.get(which, tmp_path / "absent.gguf")
        service, _ = service_for(str(path), tmp_path)
        await service.start()
        with pytest.raises(Unavailable, match=message):
            await service.submit([1, 2, 3], 2)
        report = service.report()
        assert message.split("'")[0] in report["error"] and report["state"] == "released"
        # Another model loads fine afterwards: nothing was left half-done.
        loaded = await service.load(str(models["qwen2"]))
        assert loaded["model"]["architecture"] == "qwen2"
        assert service.report()["error"] is None
        await service.stop()

    asyncio.run(scenario())


def test_not_enough_memory_for_weights_and_pool_is_refused_with_the_figures(models, tmp_path):
    async def scenario() -> None:
        service, _ = service_for(str(models["llama"]), tmp_path, kv_cache="64TiB")
        await service.start()
        with pytest.raises(Unavailable, match=r"needs \d.* as float32 weights, 64\.0 TiB for "
                           r"the KV pool \(engine\.kv_cache\) .* only .* is available"):
            await service.load()
        assert service.engine is None

    asyncio.run(scenario())


def test_load_switches_models_and_unload_frees_them_until_the_next_request(models, tmp_path):
    async def scenario() -> None:
        service, events = service_for(str(models["llama"]), tmp_path)
        await service.start()
        first = await service.load()
        assert first["model"]["architecture"] == "llama"
        other = await service.load(str(models["qwen2"]))
        assert other["model"]["architecture"] == "qwen2"
        assert (await service.unload()) == {"unloaded": True, "model": str(models["qwen2"])}
        assert service.engine is None and service.report()["model"]["loaded"] is False
        reply = await service.submit([1, 2, 3], 2)  # loads the chosen model again
        await finish(service, reply["id"], events)
        assert service.report()["model"]["architecture"] == "qwen2"
        back = await service.load("llama3.2-1b")  # a synthetic preset is a model too
        assert back["model"]["synthetic"] is True
        with pytest.raises(InvalidParams, match=r"model: is not a known preset .* did you "
                           r"mean .llama3.1-8b."):
            await service.load("llama3.1-8")
        await service.stop()

    asyncio.run(scenario())


def test_load_and_unload_wait_for_running_requests(models, tmp_path):
    async def scenario() -> None:
        service, _ = service_for(str(models["llama"]), tmp_path)
        await service.start()
        reply = await service.submit(list(range(1, 40)), 40)
        with pytest.raises(Busy):
            await service.load(str(models["qwen2"]))
        with pytest.raises(Busy):
            await service.unload()
        await service.abort(reply["id"])
        assert (await service.unload())["unloaded"] is True
        await service.stop()

    asyncio.run(scenario())


def test_a_bench_runs_on_a_language_model_with_exact_token_counts(models, tmp_path):
    async def scenario() -> None:
        from velod.engine.runtime.workload import Workload

        service, _ = service_for(str(models["gemma3"]), tmp_path)
        await service.start()
        result = await service.run_bench(Workload(requests=4, prompt=12, gen=5))
        assert result["exact_token_counts"] is True and result["model_name"] == "tiny-gemma3"
        with pytest.raises(InvalidParams, match="verify"):
            await service.run_bench(Workload(requests=1, prompt=4, gen=2, verify=1))
        await service.stop()

    asyncio.run(scenario())


def test_listeners_hear_each_token_and_the_end_and_a_failing_one_stops_nothing(models,
                                                                              tmp_path):
    from velod.engine.models.sampling import SamplingParams

    async def scenario() -> None:
        service, events = service_for(str(models["llama"]), tmp_path)
        await service.start()
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
        await service.stop()

    asyncio.run(scenario())
