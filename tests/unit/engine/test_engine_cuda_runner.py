"""The engine on a GPU builds its model through the CUDA runner — tested here with the device
mocked at its Protocol, as the runner's own tests do (this machine has no GPU: nothing here
ran on CUDA).

The backend is the NumPy one flagged ``on_device`` and the runner's ``ModelOps`` are
``NumpyModelOps`` (CUDA-shaped NumPy: graphs record and replay). ``build_engine`` then goes
through ``load_cuda_model`` exactly as on a GPU; the tokens must equal the NumPy model's
through the same engine. A model without a window pool runs greedy steps through the runner's
``run_batch`` (decode-only steps replay graphs); Gemma 3's window pool and sampled requests
go layer by layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import velod.kernels.model_ops as model_ops
from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny
from tests.unit.engine.numpy_model_ops import NumpyModelOps
from velod.engine.models.cuda_runner import CudaTransformer
from velod.engine.models.sampling import SamplingParams
from velod.engine.runtime.engine import Engine, build_engine
from velod.engine.settings import EngineSettings
from velod.kernels import NumpyBackend


class DeviceBackend(NumpyBackend):
    """The NumPy backend standing in for a CUDA device (arrays are host arrays)."""

    name = "cuda (mocked)"
    on_device = True
    device_name = "mocked device"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(root / f"{arch}.gguf", spec, seed=len(arch))
            for arch, spec in SPECS.items()}


@pytest.fixture
def mocked_device(monkeypatch):
    """CudaModelOps built by load_cuda_model become NumpyModelOps."""
    made: list[NumpyModelOps] = []

    def ops(backend: Any, dtype: Any) -> NumpyModelOps:
        made.append(NumpyModelOps(np.dtype(dtype)))
        return made[-1]

    monkeypatch.setattr(model_ops, "CudaModelOps", ops)
    return made


def engine_for(path, backend) -> Engine:
    settings = EngineSettings(None, model=str(path), dtype="float32", device="cuda",
                              kv_cache_bytes=8 << 20, block_size=16, max_batch_size=8,
                              max_tokens_per_step=64, language_model=True)
    return build_engine(settings, backend=backend)


def greedy_outputs(engine: Engine, prompts: list[list[int]], max_new: int,
                   sampling: SamplingParams | None = None) -> list[list[int]]:
    ids = [engine.submit(p, max_new, sampling=sampling) for p in prompts]
    outputs: dict[int, list[int]] = {}
    while engine.has_work:
        for request, _ in engine.step().finished:
            outputs[request.id] = request.output_token_ids
    return [outputs[i] for i in ids]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 97, int(rng.integers(3, 40))).tolist() for _ in range(count)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_without_windows_runs_whole_steps_through_the_runner_and_its_graphs(
        tiny, mocked_device, arch):
    engine = engine_for(tiny[arch], DeviceBackend())
    assert isinstance(engine.model, CudaTransformer) and mocked_device
    assert engine.status()["model"]["kind"].endswith("on the GPU)")
    batch = prompts(6, seed=1)
    got = greedy_outputs(engine, batch, 12)
    expected = greedy_outputs(engine_for(tiny[arch], NumpyBackend()), batch, 12)
    assert got == expected
    stats = engine.model.stats
    assert stats["graph_replays"] > 0 and stats["eager_steps"] > 0


def test_gemma3s_window_pool_goes_layer_by_layer_through_the_runner(tiny, mocked_device):
    engine = engine_for(tiny["gemma3"], DeviceBackend())
    assert isinstance(engine.model, CudaTransformer) and any(engine.pool.windowed)
    batch = prompts(5, seed=2)
    got = greedy_outputs(engine, batch, 30)  # far past the 6-token window
    expected = greedy_outputs(engine_for(tiny["gemma3"], NumpyBackend()), batch, 30)
    assert got == expected
    assert engine.model.stats["graph_replays"] == 0  # one table per layer is not the runner's


def test_sampled_requests_on_the_device_go_through_the_samplers(tiny, mocked_device):
    params = SamplingParams(temperature=0.9, seed=7, top_k=20)
    batch = prompts(3, seed=3)
    engine = engine_for(tiny["llama"], DeviceBackend())
    got = greedy_outputs(engine, batch, 10, params)
    expected = greedy_outputs(engine_for(tiny["llama"], NumpyBackend()), batch, 10, params)
    assert got == expected
    assert engine.model.stats["graph_replays"] == 0


def test_the_end_of_generation_tokens_come_with_the_runner(tiny, mocked_device):
    engine = engine_for(tiny["qwen2"], DeviceBackend())
    assert engine.eog_ids == frozenset()  # the tiny files have no vocabulary
    assert getattr(engine.model, "eog_ids", None) == frozenset()
