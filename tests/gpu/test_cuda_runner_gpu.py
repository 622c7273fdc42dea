"""The CUDA model runner on a device: tiny random GGUFs of each architecture through the real
scheduler, every step's logits against the NumPy model through the same batches.

The runner's bookkeeping is unit-tested with NumPy ModelOps (tests/unit/engine); here the
operations are the real ones (nvcc-built kernels, cuBLAS, CUDA graphs), the KV pool lives on the
device, and graph-replayed decode steps must agree with eager ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.engine.models.tiny_gguf import SPECS, write_tiny
from tests.unit.engine.scheduled import host_pool, numpy_step, run_schedule
from tests.unit.engine.test_cuda_runner import (
    CONFIG,
    STORE,
    make_runner,
    prompts_for,
    relative,
)
from velod.engine.models import load_model
from velod.engine.models.cuda_runner import CudaTransformer

# float32 differs from NumPy by summation order only; fp16/bf16 as in the unit tests
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(root / f"{arch}.gguf", spec, seed=len(arch))
            for arch, spec in SPECS.items()}


def cuda_runner(backend, path, dtype, graphs=(1, 2, 4, 8)) -> CudaTransformer:
    from velod.kernels.model_ops import CudaModelOps

    return make_runner(path, dtype, ops=CudaModelOps(backend, STORE[dtype]), graphs=graphs)


def run_on_device(backend, runner, prompts, max_new, oracle=None):
    """Per step: (decode-only, runner logits, oracle logits or None)."""
    keys, values = host_pool(runner.layers, CONFIG, runner.kv_heads, runner.head_dim,
                             runner.dtype)
    keys = [backend.to_device(k) for k in keys]
    values = [backend.to_device(v) for v in values]
    ref_keys, ref_values = host_pool(runner.layers, CONFIG, runner.kv_heads, runner.head_dim,
                                     np.float32)

    def copy(pairs):
        from velod.kernels import reference

        for layer in range(runner.layers):
            backend.copy_blocks(keys[layer], values[layer], pairs)
            reference.copy_blocks(ref_keys[layer], ref_values[layer], pairs)
        backend.synchronize()

    def step(batch):
        tokens = runner.run_batch(batch, keys, values)
        expected = numpy_step(oracle, batch, ref_keys, ref_values) if oracle else None
        return tokens, (batch.num_decode == batch.num_seqs, runner.last_logits(), expected)

    return [kept for _b, kept in run_schedule(CONFIG, prompts, max_new, step, copy).steps]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("arch", sorted(SPECS))
def test_cuda_runner_logits_match_the_numpy_model_step_by_step(cuda_backend, tiny, arch, dtype):
    runner = cuda_runner(cuda_backend, tiny[arch], dtype)
    steps = run_on_device(cuda_backend, runner, prompts_for(1), 8, load_model(tiny[arch]))
    for _decode, got, expected in steps:
        assert not np.isnan(got).any()
        assert relative(got, expected) < TOLERANCE[dtype]
    assert runner.stats["graph_replays"] > 0 and runner.stats["eager_steps"] > 0
    runner.close()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_graph_replayed_decode_steps_agree_with_eager_ones(cuda_backend, tiny, dtype):
    runs = []
    for graphs in ((1, 2, 4, 8), ()):
        runner = cuda_runner(cuda_backend, tiny["gemma3"], dtype, graphs)
        runs.append(run_on_device(cuda_backend, runner, prompts_for(3)[:3], 12))
        runner.close()
    for (decode, a, _), (_, b, _) in zip(*runs, strict=True):
        # the same kernels; cuBLAS may pick another algorithm for a 4-row than a 3-row GEMM
        assert relative(a, b) < (1e-6 if not decode else 5e-3)
        assert np.array_equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.gpu
def test_the_engine_s_layer_loop_can_drive_the_runner_with_the_backend_s_kernels(cuda_backend,
                                                                                 tiny):
    """The LanguageModel protocol: the runner's q/k/v on its stream, the cache write and
    attention by the backend on the default stream (ordered by CUDA's stream rules)."""
    backend = cuda_backend
    runner = cuda_runner(backend, tiny["qwen2"], "float16")
    oracle = load_model(tiny["qwen2"])
    keys, values = host_pool(runner.layers, CONFIG, runner.kv_heads, runner.head_dim,
                             runner.dtype)
    keys, values = [backend.to_device(k) for k in keys], [backend.to_device(v) for v in values]
    ref_keys, ref_values = host_pool(runner.layers, CONFIG, runner.kv_heads, runner.head_dim,
                                     np.float32)

    def copy(pairs):
        from velod.kernels import reference

        for layer in range(runner.layers):
            backend.copy_blocks(keys[layer], values[layer], pairs)
            reference.copy_blocks(ref_keys[layer], ref_values[layer], pairs)

    def step(batch):
        runner.begin_step(batch.token_ids, batch.positions, batch.sample_indices)
        for layer in range(runner.layers):
            q, k, v = runner.layer_qkv(layer)
            backend.write_cache(k, v, keys[layer], values[layer], batch.slot_mapping)
            attention = runner.layer_attention(layer)
            runner.layer_output(layer, backend.paged_prefill_attention(
                q, keys[layer], values[layer], batch.block_tables, batch.query_start_loc,
                batch.context_lens, attention.scale, window=attention.window))
        got = runner.logits(batch.sample_indices)
        expected = numpy_step(oracle, batch, ref_keys, ref_values)
        assert relative(got, expected) < TOLERANCE["float16"]
        return runner.sample(batch.sample_indices), None

    run_schedule(CONFIG, prompts_for(7), 6, step, copy)
