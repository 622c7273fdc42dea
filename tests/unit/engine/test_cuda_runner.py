"""The CUDA model runner's bookkeeping, with its device operations done in NumPy.

The runner (``velod.engine.models.cuda_runner``) talks to the GPU only through ``ModelOps``;
here that is ``NumpyModelOps`` (a CUDA-shaped NumPy stand-in: graphs record and replay, host
copies inside a capture fail, memory is counted). Tiny random GGUFs of each architecture go
through the real scheduler (chunked prefill, prefix caching, decode-first batches), and every
step's logits are compared with the NumPy model (``TransformerModel``) driven through the same
batches with the NumPy kernels. What this cannot show, the GPU check does: that the CUDA
kernels and cuBLAS compute what their NumPy twins compute, and how fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tests.unit.engine.numpy_model_ops import NumpyModelOps
from tests.unit.engine.scheduled import host_pool, numpy_step, run_schedule
from tests.unit.tiny_gguf import SPECS, write_tiny
from velod.engine.core.errors import EngineError
from velod.engine.core.scheduler import Scheduler
from velod.engine.core.scheduler_config import SchedulerConfig
from velod.engine.models import LanguageModel, load_model
from velod.engine.models.cuda_runner import (
    CudaTransformer,
    DeviceMemoryError,
    device_weight_bytes,
    load_device_weights,
)
from velod.engine.models.hparams import read_hparams
from velod.kernels import reference
from velod.kernels.layout import to_float32
from velod.model.gguf import open_gguf

BLOCK = 16
CONFIG = SchedulerConfig(num_blocks=64, block_size=BLOCK, max_batch_size=6,
                         max_tokens_per_step=48, max_model_len=256, vocab_size=97)
STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny(root / f"{arch}.gguf", spec, seed=len(arch))
            for arch, spec in SPECS.items()}


def make_runner(path, dtype="float32", *, ops=None, graphs=(1, 2, 4, 8)) -> CudaTransformer:
    ops = ops or NumpyModelOps(STORE[dtype])
    gguf = open_gguf(path)
    try:
        hp = read_hparams(gguf.metadata, {n: t.shape for n, t in gguf.tensors.items()})
        weights = load_device_weights(gguf, hp, ops, STORE[dtype])
    finally:
        gguf.close()
    return CudaTransformer(hp, weights, ops, max_tokens=CONFIG.max_tokens_per_step,
                           max_seqs=CONFIG.max_batch_size, block_size=BLOCK,
                           max_blocks_per_seq=CONFIG.max_model_len // BLOCK,
                           graph_batch_sizes=graphs)


def pool(model, dtype) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return host_pool(model.layers, CONFIG, model.kv_heads, model.head_dim, STORE[dtype])


@dataclass
class Step:
    decode_only: bool
    num_decode: int
    num_tokens: int
    logits: np.ndarray
    expected: np.ndarray | None


def drive(runner, prompts, max_new, *, oracle=None, dtype="float32") -> list[Step]:
    """Runs prompts through the scheduler and the runner (and the oracle beside it)."""
    keys, values = pool(runner, dtype)
    oracle_keys, oracle_values = pool(runner, "float32")

    def copy(pairs):  # copy-on-write, as the engine does before a step
        for layer in range(runner.layers):
            reference.copy_blocks(keys[layer], values[layer], pairs)
            reference.copy_blocks(oracle_keys[layer], oracle_values[layer], pairs)

    def step(batch):
        tokens = runner.run_batch(batch, keys, values)
        expected = numpy_step(oracle, batch, oracle_keys, oracle_values) if oracle else None
        return tokens, Step(batch.num_decode == batch.num_seqs, batch.num_decode,
                            batch.num_tokens, runner.last_logits(), expected)

    return [kept for _batch, kept in run_schedule(CONFIG, prompts, max_new, step, copy).steps]


def prompts_for(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 97, 20).tolist()  # two prompts share 20 tokens (prefix cache)
    return [shared + rng.integers(0, 97, 9).tolist(), rng.integers(0, 97, 70).tolist(),
            shared + rng.integers(0, 97, 3).tolist(), rng.integers(0, 97, 5).tolist()]


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_every_step_s_logits_equal_the_numpy_model_s(tiny, arch):
    runner = make_runner(tiny[arch])
    steps = drive(runner, prompts_for(1), 8, oracle=load_model(tiny[arch]))
    for step in steps:
        assert relative(step.logits, step.expected) < 1e-5
        assert np.array_equal(step.logits.argmax(-1), step.expected.argmax(-1))
    # both paths ran: prompt chunks (a 70-token prompt in chunks) and replayed decode steps
    assert runner.stats["eager_steps"] > 0 and runner.stats["graph_replays"] > 0
    assert any(s.num_tokens > s.num_decode > 0 for s in steps)  # a mixed step too


@pytest.mark.parametrize(("arch", "dtype", "tolerance"), [
    ("gemma3", "float16", 2e-2), ("gemma3", "bfloat16", 8e-2),
    ("llama", "float16", 2e-2),  # its F16 output matrix is copied as stored
    ("qwen2", "bfloat16", 8e-2),  # its BF16 attn_output likewise
])
def test_half_precision_weights_and_cache_stay_close_to_the_float32_model(tiny, arch, dtype,
                                                                          tolerance):
    runner = make_runner(tiny[arch], dtype)
    for layer in runner.weights.layers:
        assert layer.wqkv.dtype == STORE[dtype] and layer.attn_norm.dtype == np.float32
    steps = drive(runner, prompts_for(2), 6, oracle=load_model(tiny[arch]), dtype=dtype)
    assert max(relative(s.logits, s.expected) for s in steps) < tolerance


def test_decode_steps_replay_one_graph_per_bucket_exactly_as_eager_steps_compute(tiny):
    graphs = make_runner(tiny["llama"])
    eager = make_runner(tiny["llama"], graphs=())
    prompts = prompts_for(3)[:3]  # three sequences decode together: bucket 4, one padding row
    with_graphs, without = drive(graphs, prompts, 10), drive(eager, prompts, 10)
    assert len(with_graphs) == len(without)
    for a, b in zip(with_graphs, without, strict=True):
        # the same arithmetic; BLAS may round a 4-row GEMM differently from a 3-row one
        assert relative(a.logits, b.logits) < 1e-6
        assert np.array_equal(a.logits.argmax(-1), b.logits.argmax(-1))
    decode_steps = sum(s.decode_only for s in with_graphs)
    assert graphs.stats["graph_replays"] == decode_steps and eager.stats["graph_replays"] == 0
    # one capture per bucket used (sequences finish at different times: 4, 2, 1 ...)
    assert graphs.ops.captures == graphs.stats["graph_captures"] == len(graphs._graphs)
    assert graphs.ops.captures <= len(graphs.graph_batch_sizes)


def test_padding_rows_of_a_bucket_write_no_cache_slot_and_replays_read_new_tables(tiny):
    caches = {}
    for name, graphs in (("graphs", (1, 2, 4, 8)), ("eager", ())):
        model = make_runner(tiny["qwen2"], graphs=graphs)
        keys, values = pool(model, "float32")

        def copy(pairs, keys=keys, values=values, model=model):
            for layer in range(model.layers):
                reference.copy_blocks(keys[layer], values[layer], pairs)

        run_schedule(CONFIG, prompts_for(4)[:3], 5,
                     lambda b, m=model, k=keys, v=values: (m.run_batch(b, k, v), None), copy)
        caches[name] = keys
    for a, b in zip(caches["graphs"], caches["eager"], strict=True):
        written = ~np.isnan(a)
        assert np.array_equal(written, ~np.isnan(b))  # padding rows wrote no slot
        assert np.allclose(a[written], b[written], rtol=1e-5, atol=1e-6)


def test_decode_rows_go_to_the_decode_kernel_and_prompt_chunks_to_the_prefill_kernel(tiny):
    runner = make_runner(tiny["llama"], graphs=())
    steps = drive(runner, prompts_for(5), 4)
    rows = iter(runner.ops.attention_rows)
    for step in steps:
        for _layer in range(runner.layers):
            if step.num_decode:
                assert next(rows) == ("decode", step.num_decode)
            if step.num_tokens > step.num_decode:
                assert next(rows) == ("prefill", step.num_tokens - step.num_decode)
    assert next(rows, None) is None


def test_weights_load_into_their_final_device_arrays_only(tiny):
    ops = NumpyModelOps(np.float16)
    runner = make_runner(tiny["llama"], "float16", ops=ops)
    info = runner.weights.info
    names = frozenset(open_gguf(tiny["llama"]).tensors)
    assert info["bytes"] == device_weight_bytes(runner.hp, names, np.float16)
    assert info["device_peak_bytes"] == info["bytes"]  # no device temporaries while loading
    assert runner.weights.embedding.dtype == np.float16
    assert runner.weights.rope_factors is not None  # kept on the host: folded into RoPE


def test_weights_that_do_not_fit_are_refused_before_anything_is_allocated(tiny):
    ops = NumpyModelOps(np.float16, capacity=100 << 20)  # below the headroom alone
    with pytest.raises(DeviceMemoryError, match="free device memory"):
        make_runner(tiny["llama"], "float16", ops=ops)
    assert ops.allocated == 0


def test_a_new_kv_pool_is_captured_again(tiny):
    runner = make_runner(tiny["gemma3"])
    for _ in range(2):  # each drive allocates a fresh pool
        drive(runner, [[1, 2, 3]], 3)
    assert runner.stats["graph_captures"] == 2


def test_token_ids_out_of_the_vocabulary_are_refused(tiny):
    runner = make_runner(tiny["llama"])
    scheduler = Scheduler(CONFIG.replace(vocab_size=None))
    scheduler.submit([5, 200, 7], 2)
    batch = scheduler.step()
    keys, values = pool(runner, "float32")
    with pytest.raises(EngineError, match="out of range"):
        runner.run_batch(batch, keys, values)
    assert np.isnan(to_float32(keys[0])).all()  # nothing was written


def test_the_engine_can_drive_the_runner_layer_by_layer_as_a_language_model(tiny):
    runner, oracle = make_runner(tiny["gemma3"]), load_model(tiny["gemma3"])
    assert isinstance(runner, LanguageModel)
    keys, values = pool(runner, "float32")
    oracle_keys, oracle_values = pool(runner, "float32")

    def copy(pairs):
        for caches in ((keys, values), (oracle_keys, oracle_values)):
            for k, v in zip(*caches, strict=True):
                reference.copy_blocks(k, v, pairs)

    def step(batch):
        got = numpy_step(runner, batch, keys, values)  # the engine's per-layer protocol
        expected = numpy_step(oracle, batch, oracle_keys, oracle_values)
        assert relative(got, expected) < 1e-5
        tokens = runner.sample(batch.sample_indices)
        assert np.array_equal(tokens, expected.argmax(-1))
        return tokens, None

    run_schedule(CONFIG, prompts_for(6), 5, step, copy)
    assert runner.stats == {"graph_captures": 0, "graph_replays": 0, "eager_steps": 0}
