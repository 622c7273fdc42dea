"""The engine without the daemon: pool sizing, synthetic model, steps checked against dense."""

from __future__ import annotations

import io
import shutil
from contextlib import contextmanager

import numpy as np
import pytest

from velod.engine.runtime.engine import Engine, build_engine
from velod.engine.runtime.metrics import percentile
from velod.engine.runtime.pool import KVPool, PoolError, plan_pool, storage_dtype
from velod.engine.runtime.synthetic import (
    VOCAB_SIZE,
    SyntheticModel,
    next_tokens,
    salt,
    synthetic_vectors,
)
from velod.engine.runtime.workload import BenchRun, Workload
from velod.engine.settings import EngineSettings
from velod.kernels import NumpyBackend
from velod.kernels.synthetic import CUDA_SOURCE, cuda_source
from velod.model.metadata import Geometry

SMALL = Geometry.attention_only(layers=2, heads=4, kv_heads=2, head_dim=64, context_length=512)
BLOCK_BYTES_F32 = 16 * 2 * 2 * 2 * 64 * 4


def spec(**changes) -> EngineSettings:
    values = {"geometry": SMALL, "model": "small", "dtype": "float32", "device": "cpu",
              "kv_cache_bytes": 256 * BLOCK_BYTES_F32, "max_batch_size": 8,
              "max_tokens_per_step": 128} | changes
    return EngineSettings(**values)


def run(engine: Engine, workload: Workload) -> dict:
    bench = BenchRun(engine, workload, "test")
    while engine.has_work:
        outcome = engine.step()
        bench.on_step(outcome.record, outcome.finished)
    return bench.result(bench.verify() if workload.verify else None)


# ------------------------------------------------------------------------------ the pool


def test_pool_in_bytes_is_whole_blocks_of_every_layer():
    plan = plan_pool(spec(kv_cache_bytes=10 * BLOCK_BYTES_F32 + 5), 1 << 40, "host")
    assert plan.block_bytes == BLOCK_BYTES_F32 and plan.num_blocks == 10
    assert plan.bytes == 10 * BLOCK_BYTES_F32


def test_pool_as_a_fraction_of_free_memory():
    plan = plan_pool(spec(kv_cache_bytes=None, kv_cache_fraction=0.5), 100 * BLOCK_BYTES_F32,
                     "host")
    assert plan.num_blocks == 50


def test_pool_larger_than_free_memory_is_refused_with_what_to_change():
    with pytest.raises(PoolError, match=r"engine\.kv_cache.*only .* free"):
        plan_pool(spec(kv_cache_bytes=1 << 40), 1 << 30, "host")
    with pytest.raises(PoolError, match="at least 2 are needed"):
        plan_pool(spec(kv_cache_bytes=BLOCK_BYTES_F32), 1 << 30, "host")


def test_pool_allocation_failure_is_a_pool_error():
    class NoMemory(NumpyBackend):
        def empty(self, shape, dtype):
            raise MemoryError("out of memory")

    with pytest.raises(PoolError, match="cannot allocate the KV pool"):
        KVPool(spec(), plan_pool(spec(), 1 << 40, "host"), NoMemory())


def test_pool_arrays_have_the_kernel_layout():
    engine = build_engine(spec(dtype="bfloat16"))
    assert len(engine.pool.keys) == len(engine.pool.values) == SMALL.layers
    assert engine.pool.keys[0].shape == (engine.pool.num_blocks, 16, 2, 64)
    assert engine.pool.keys[0].dtype == storage_dtype("bfloat16") == np.uint16


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_vectors_follow_their_scalar_definition():
    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & 0xFFFFFFFF
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & 0xFFFFFFFF
        return x ^ (x >> 16)

    token, position, element, s = 1234, 77, 5, salt(0, 1, 2)
    seed = fmix(((token * 0x9E3779B1) & 0xFFFFFFFF)
                ^ fmix((position * 0x85EBCA77 + s) & 0xFFFFFFFF))
    bits = fmix(seed ^ ((element * 0x27D4EB2F) & 0xFFFFFFFF))
    expected = np.float32(bits >> 8) * np.float32(2.0**-23) - np.float32(1)
    values = synthetic_vectors(np.array([token]), np.array([position]), 8, s)
    assert values[0, element] == expected


def test_synthetic_vectors_depend_on_token_position_and_layer_only():
    tokens, positions = np.array([5, 5, 6]), np.array([0, 1, 0])
    a = synthetic_vectors(tokens, positions, 64, salt(0, 0, 1))
    assert np.array_equal(a, synthetic_vectors(tokens, positions, 64, salt(0, 0, 1)))
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    assert not np.array_equal(a, synthetic_vectors(tokens, positions, 64, salt(0, 1, 1)))
    assert a.min() >= -1 and a.max() < 1 and abs(float(a.mean())) < 0.1


def test_synthetic_next_token_is_in_the_vocabulary_and_deterministic():
    tokens = np.arange(1000, dtype=np.int32)
    out = next_tokens(tokens, tokens, seed=3)
    assert out.dtype == np.int32 and out.min() >= 0 and out.max() < VOCAB_SIZE
    assert np.array_equal(out, next_tokens(tokens, tokens, seed=3))


def test_synthetic_model_says_it_is_not_a_language_model():
    model = SyntheticModel(4, 2, 64, np.float32)
    assert "not a language model" in model.kind


@pytest.mark.skipif(shutil.which("nvcc") is None and not shutil.os.path.exists(
    "/usr/local/cuda/bin/nvcc"), reason="nvcc not installed")
def test_cuda_generator_compiles_the_way_the_backend_builds_it(tmp_path):
    from velod.kernels.cuda import compile_cubin

    assert "velod_synthetic_qkv" in cuda_source()
    # CudaBackend.function: compile_cubin on the packaged file, cached in velod's cache dir.
    cubin = compile_cubin("sm_80", (), cache_dir=tmp_path, source=CUDA_SOURCE)
    assert cubin.name.startswith("synthetic_qkv-sm_80-") and cubin.read_bytes()[:4] == b"\x7fELF"


# ------------------------------------------------------------------------------ stepping


@pytest.mark.parametrize(("dtype", "tolerance"), [
    ("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_attention_outputs_equal_the_dense_reference(dtype, tolerance):
    engine = build_engine(spec(dtype=dtype))
    result = run(engine, Workload(requests=4, prompt=40, gen=12, verify=2))
    assert result["exact_token_counts"] and result["finished"] == 4
    # Prefill chunks, the first decode steps and block edges were all checked.
    assert result["verify"]["positions"] == 2 * len(Workload(prompt=40, gen=12)
                                                    .checked_positions(16))
    assert result["verify"]["max_abs_error"] < tolerance


def test_a_corrupted_cache_block_is_caught_by_verification():
    engine = build_engine(spec())
    workload = Workload(requests=1, prompt=40, gen=12, verify=1)
    bench = BenchRun(engine, workload, "test")
    outcome = engine.step()  # the whole prompt is prefilled: positions 0..39 are cached
    bench.on_step(outcome.record, outcome.finished)
    engine.pool.values[1][engine.scheduler.block_manager.block_ids(bench.ids[0])[0]] += 1.0
    while engine.has_work:
        outcome = engine.step()
        bench.on_step(outcome.record, outcome.finished)
    assert bench.verify()["max_abs_error"] > 0.01


def test_a_tiny_pool_preempts_and_recomputes_exactly():
    engine = build_engine(spec(kv_cache_bytes=10 * BLOCK_BYTES_F32))
    result = run(engine, Workload(requests=6, prompt=40, gen=30, verify=3, priority=True))
    assert result["preemptions"] > 0
    assert result["exact_token_counts"] and result["finished"] == 6
    assert result["verify"]["max_abs_error"] < 1e-5


def test_shared_prefix_blocks_are_reused_and_stay_correct():
    engine = build_engine(spec(max_tokens_per_step=64))
    result = run(engine, Workload(requests=4, prompt=64, gen=4, shared_prefix=0.5, verify=4))
    # 32 shared tokens = 2 blocks; every request after the first reuses them.
    assert result["prefix_cache"]["hit_tokens"] == 3 * 32
    assert result["verify"]["max_abs_error"] < 1e-5


def test_copy_on_write_fork_copies_the_shared_partial_block():
    engine = build_engine(spec())
    parent = engine.submit(np.arange(1, 21, dtype=np.int32), 10)  # 20 tokens: block 2 partial
    engine.step()
    child = engine.scheduler.fork(parent)
    positions = set(range(20, 29))
    engine.watch.update({parent: set(positions), child: set(positions)})
    copies = 0
    finished = {}
    while engine.has_work:
        batch = engine.schedule()
        copies += len(batch.copies)
        outcome = engine.complete(batch, engine.execute(batch))
        finished.update({r.id: r for r, _ in outcome.finished})
    assert copies == 1
    for seq_id in (parent, child):
        tokens = np.concatenate((np.arange(1, 21), finished[seq_id].output_token_ids))
        check = engine.verify(seq_id, tokens.astype(np.int32))
        assert check["positions"] and check["max_abs_error"] < 1e-5


def test_an_abort_between_schedule_and_complete_drops_only_that_request():
    engine = build_engine(spec())
    keep = engine.submit([1, 2, 3], 3)
    gone = engine.submit([4, 5, 6], 3)
    batch = engine.schedule()
    result = engine.execute(batch)
    assert engine.abort(gone)
    engine.complete(batch, result)
    finished = [r for r, _ in engine.run_until_idle()]
    assert [(r.id, len(r.output_token_ids)) for r in finished] == [(keep, 3)]
    assert not engine.has_work and engine.schedule().is_empty


def test_a_model_plugs_in_through_the_model_protocol():
    class Recording(SyntheticModel):
        def __init__(self):
            super().__init__(4, 2, 64, np.float32)
            self.calls: list[tuple] = []

        def layer_qkv(self, layer):
            self.calls.append(("qkv", layer))
            return super().layer_qkv(layer)

        def layer_output(self, layer, attention):
            self.calls.append(("out", layer, attention.shape))

    model = Recording()
    s = spec()
    backend = NumpyBackend()
    engine = Engine(s, backend, KVPool(s, plan_pool(s, 1 << 40, "host"), backend), model)
    engine.submit([7, 8, 9], 1)
    engine.step()
    assert model.calls == [("qkv", 0), ("out", 0, (3, 4, 64)), ("qkv", 1), ("out", 1, (3, 4, 64))]


def test_status_and_step_metrics():
    engine = build_engine(spec())
    run(engine, Workload(requests=3, prompt=20, gen=5))
    status = engine.status()
    assert status["backend"] == "numpy" and status["finished"] == 3
    assert status["pool"]["blocks"] == 256 and status["pool"]["blocks_used"] == 0
    assert status["generated_tokens"] == 15 and status["step_s"]["p50"] > 0
    shares = status["breakdown"]
    assert 0 <= shares["overhead_share"] < 1 and shares["attention_s"] > 0


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(range(101), 99) == 99


class CudaShapedBackend(NumpyBackend):
    """The NumPy math behind a device backend's surface (PyCUDA cannot run here)."""

    name = "cuda"
    on_device = True
    device_name = "CUDA-shaped NumPy"

    def __init__(self) -> None:
        self.contexts = self.uploads = self.syncs = 0
        self.trimmed = False
        self.max_contexts: list[int | None] = []

    @contextmanager
    def active(self):
        self.contexts += 1
        yield

    def stage(self, name, array):
        self.uploads += 1
        return super().to_device(array)

    def synchronize(self) -> None:
        self.syncs += 1

    def trim(self) -> None:
        self.trimmed = True

    def free_memory(self) -> int:
        return 3 * 1024**3

    def paged_attention(self, *args, max_context=None, out=None, **kwargs):
        self.max_contexts.append(max_context)
        assert out is not None  # the engine reuses one output buffer on CUDA
        return super().paged_attention(*args, out=out, **kwargs)


def test_device_path_uploads_indices_once_per_step_profiles_and_stays_exact():
    backend = CudaShapedBackend()
    s = spec()
    model = SyntheticModel(4, 2, 64, np.float32)  # host q/k/v: no device generator here
    engine = Engine(s, backend, KVPool(s, plan_pool(s, backend.free_memory(), "GPU"), backend),
                    model, profile=True)
    result = run(engine, Workload(requests=4, prompt=40, gen=8, verify=2))
    steps = result["steps"]
    assert result["exact_token_counts"] and result["verify"]["max_abs_error"] < 1e-5
    assert backend.syncs == steps and backend.uploads == 3 * steps  # tables, lengths, slots
    assert backend.contexts >= steps and None not in backend.max_contexts
    assert 0 < result["breakdown"]["kernel_s"] < result["breakdown"]["step_s"]


def test_close_frees_the_pool_inside_the_device_context_and_closes_the_model():
    backend = CudaShapedBackend()
    s = spec()
    closed = []

    class ClosingModel(SyntheticModel):
        def close(self) -> None:
            closed.append(backend.contexts)  # called with the context active

    model = ClosingModel(4, 2, 64, np.float32)
    engine = Engine(s, backend, KVPool(s, plan_pool(s, 2**30, "GPU"), backend), model)
    run(engine, Workload(requests=2, prompt=20, gen=3))
    before = backend.contexts
    engine.close()
    assert closed == [before + 1] and backend.contexts == before + 1
    assert engine.pool.keys == [] and engine.pool.values == [] and engine._out is None
    assert backend.trimmed  # the backend's scratch and staging buffers go too


def test_cuda_context_activation_nests_per_thread_without_pushing_again():
    import threading

    from velod.kernels.cuda import _Activation

    events = []

    class Context:
        def push(self):
            events.append(("push", threading.current_thread().name))

        @staticmethod
        def pop():
            events.append(("pop", threading.current_thread().name))

    activation = _Activation(Context(), Context)
    with activation:
        with activation, activation:
            assert events == [("push", "MainThread")]
        worker = threading.Thread(target=lambda: activation.__enter__() or activation.__exit__(),
                                  name="worker")
        worker.start()
        worker.join()
    assert events == [("push", "MainThread"), ("push", "worker"), ("pop", "worker"),
                      ("pop", "MainThread")]


def test_prefill_attention_last_computes_only_sampled_rows_and_keeps_the_tokens():
    outputs = {}
    for mode in ("all", "last"):
        engine = build_engine(spec(prefill_attention=mode, max_tokens_per_step=32))
        result = run(engine, Workload(requests=3, prompt=70, gen=6, verify=3))
        assert result["verify"]["max_abs_error"] < 1e-5 and result["exact_token_counts"]
        outputs[mode] = (result["sampled_tokens"], result["verify"]["positions"])
    assert outputs["all"][0] == outputs["last"][0] == 18
    assert outputs["last"][1] < outputs["all"][1]  # prompt positions were not attended


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_velodctl_bench_progress_is_a_redrawn_bar_on_a_terminal_and_lines_elsewhere():
    from velod.control.progress import ProgressView
    from velod.engine.cli import PLAIN_INTERVAL, render_progress

    tty = Terminal()
    view = ProgressView(tty, "bench", PLAIN_INTERVAL)
    for done in (0, 32, 64):
        view.draw(*render_progress({"fraction": done / 64, "generated": done, "target": 64,
                                    "finished": 0, "requests": 4, "tokens_per_s": 10.0,
                                    "elapsed_s": 1.0}))
    view.finish()
    text = tty.getvalue()
    assert text.count("\r[") == 3 and "[" + "#" * 15 + "." * 15 + "]" in text
    assert text.endswith("\n") and "100%" in text

    pipe = io.StringIO()
    plain = ProgressView(pipe, "bench", PLAIN_INTERVAL)
    for done in (0, 1, 64):  # the middle one comes within a second: not repeated
        plain.draw(*render_progress({"fraction": done / 64, "generated": done, "target": 64}))
    assert pipe.getvalue().count("bench: ") == 2 and "\r" not in pipe.getvalue()
