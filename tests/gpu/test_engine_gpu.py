"""The engine on a CUDA device: the device q/k/v generator and whole workloads vs dense math.

Skipped (with the reason) where PyCUDA, a driver, a device or nvcc is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from velod.engine.runtime.engine import build_engine
from velod.engine.runtime.synthetic import SyntheticModel
from velod.engine.runtime.workload import BenchRun, Workload
from velod.engine.settings import EngineSettings
from velod.kernels.layout import to_float32
from velod.model.metadata import Geometry

SMALL = Geometry.attention_only(layers=2, heads=8, kv_heads=2, head_dim=128, context_length=2048)
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_device_generator_makes_the_host_generators_numbers(cuda_backend, dtype):
    store = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    device = SyntheticModel(8, 2, 128, store, cuda_backend, seed=5)
    host = SyntheticModel(8, 2, 128, store, None, seed=5)
    tokens = np.array([0, 1, 31999, 77, 77], np.int32)
    positions = np.array([0, 5, 9, 1000, 1001], np.int32)
    device.begin_step(tokens, positions)
    for layer in (0, 3):
        got = [cuda_backend.to_host(a) for a in device.layer_qkv(layer)]
        want = host.host_qkv(tokens, positions, layer)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and np.array_equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("prefill", ["all", "last"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_engine_workload_on_cuda_equals_the_dense_reference(dtype, prefill):
    spec = EngineSettings(SMALL, "small", dtype=dtype, device="cuda",
                          kv_cache_bytes=64 * 1024**2, max_batch_size=8,
                          max_tokens_per_step=256, prefill_attention=prefill)
    engine = build_engine(spec, profile=True)
    assert engine.backend.name == "cuda"
    run = BenchRun(engine, Workload(6, 100, 20, shared_prefix=0.5, verify=3), "gpu")
    while engine.has_work:
        outcome = engine.step()
        run.on_step(outcome.record, outcome.finished)
    result = run.result(run.verify())
    assert result["exact_token_counts"] and result["finished"] == 6
    assert result["verify"]["positions"] > 0
    assert result["verify"]["max_abs_error"] < TOLERANCE[dtype]
    assert 0 < result["breakdown"]["kernel_s"] <= result["breakdown"]["step_s"]


@pytest.mark.gpu
def test_engine_pool_on_cuda_fills_blocks_like_the_cpu_engine():
    outputs = {}
    for device in ("cpu", "cuda"):
        spec = EngineSettings(SMALL, "small", dtype="float16", device=device,
                              kv_cache_bytes=32 * 1024**2, max_batch_size=4,
                              max_tokens_per_step=128)
        engine = build_engine(spec)
        engine.submit(np.arange(1, 50, dtype=np.int32), 5)
        engine.run_until_idle()
        # 49 prompt tokens and 4 fed-back ones sit in blocks 0..3 (the LIFO stack's first).
        keys = to_float32(engine.backend.to_host(engine.pool.keys[1])[:4])
        outputs[device] = keys.reshape(-1, *keys.shape[2:])[:53]
    assert np.array_equal(outputs["cpu"], outputs["cuda"])
