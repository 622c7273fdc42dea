"""The GPU forward's operations on a device (CudaModelOps: fused kernels, cuBLAS through ctypes,
CUDA graphs through the driver API) against the NumPy ops of the CPU forward.

The same cases and oracles as the emulator tests (tests/unit/kernels/test_model_ops_emulation),
now compiled by nvcc and run by the driver; cuBLAS against NumPy's matmul in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import velod.engine.models.ops as ops
from tests.unit.kernels.test_model_ops_emulation import (
    QKV_CASES,
    TOLERANCE,
    error,
    expected_qkv,
    logits_with_edge_cases,
)
from velod.engine.models.hparams import Rope
from velod.kernels.layout import bf16_bits, from_float32, to_float32

DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
GPU_TOLERANCE = {**TOLERANCE, "f32": 1e-5}  # the device's exp/tanh/sqrt, not glibc's


@pytest.fixture(scope="module")
def device_ops(cuda_backend):
    from velod.kernels.model_ops import CudaModelOps

    return {name: CudaModelOps(cuda_backend, dtype) for name, dtype in DTYPES.items()}


def up(o, array):
    device = o.empty(array.shape, array.dtype)
    o.upload(device, array)
    return device


def down(o, array):
    o.synchronize()
    return o.download(array)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_embedding_rows_norms_and_gates_match_numpy(device_ops, dtype):
    o = device_ops[dtype]
    rng = np.random.default_rng(1)
    store = DTYPES[dtype]
    table = from_float32(rng.standard_normal((50, 640), dtype=np.float32), store)
    tokens = np.array([0, 49, 7, 50, -1], np.int32)
    hidden = o.empty((5, 640), np.float32)
    o.embed(hidden, up(o, table), up(o, tokens), math.sqrt(640))
    want = to_float32(table)[np.clip(tokens, 0, 49)] * np.float32(math.sqrt(640))
    want[[3, 4]] = 0
    assert np.array_equal(down(o, hidden), want)

    x = rng.standard_normal((6, 4096), dtype=np.float32) * 3
    weight = rng.standard_normal(4096, dtype=np.float32) + 1
    out = o.empty((3, 4096), store)
    o.rms_norm(out, up(o, x), up(o, weight), 1e-6, index=up(o, np.array([5, 0, 3], np.int32)))
    assert error(down(o, out), from_float32(ops.rms_norm(x[[5, 0, 3]], weight, 1e-6),
                                            store)) < GPU_TOLERANCE[dtype]

    gate_up = rng.standard_normal((7, 2 * 14336), dtype=np.float32) * 1.5
    for activation in ("silu", "gelu_tanh"):
        act = o.empty((7, 14336), store)
        o.gate(act, up(o, gate_up), activation)
        want = from_float32(ops.ACTIVATIONS[activation](gate_up), store)
        assert error(down(o, act), want) < GPU_TOLERANCE[dtype], activation


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("arch", sorted(QKV_CASES))
def test_qkv_bias_norms_and_rope_match_the_numpy_layer(device_ops, dtype, arch):
    o = device_ops[dtype]
    heads, kv_heads, dim, (dims, base, scale, style), has_factors, has_bias, qk_norm = \
        QKV_CASES[arch]
    rng = np.random.default_rng(len(arch))
    rope = Rope(dims, base, scale, style, has_factors)
    factors = rng.uniform(1, 8, dims // 2).astype(np.float32) if has_factors else None
    width = (heads + 2 * kv_heads) * dim
    rows = rng.standard_normal((9, width), dtype=np.float32)
    bias = rng.standard_normal(width, dtype=np.float32) if has_bias else None
    q_norm = rng.standard_normal(dim, dtype=np.float32) + 1 if qk_norm else None
    k_norm = rng.standard_normal(dim, dtype=np.float32) + 1 if qk_norm else None
    positions = np.array([0, 1, 2, 17, 511, 4095, 5000, 32767, 131071], np.int32)
    store = DTYPES[dtype]
    q, k, v = (o.empty((9, n, dim), store) for n in (heads, kv_heads, kv_heads))
    o.qkv(q, k, v, up(o, rows), bias=None if bias is None else up(o, bias),
          q_norm=None if q_norm is None else up(o, q_norm),
          k_norm=None if k_norm is None else up(o, k_norm), positions=up(o, positions),
          inv_freq=up(o, ops.rope_inverse_frequencies(rope, factors)), rope_dims=dims,
          neox=style == "neox", eps=1e-6)
    want = expected_qkv(rows, positions, heads, kv_heads, dim, rope, factors, bias, q_norm,
                        k_norm, 1e-6)
    for got, expected in zip((q, k, v), want, strict=True):
        assert error(down(o, got), from_float32(expected, store)) < GPU_TOLERANCE[dtype]


@pytest.mark.gpu
def test_residual_argmax_and_topk_match_numpy(device_ops):
    o = device_ops["f32"]
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((3, 640), dtype=np.float32)
    x = rng.standard_normal((3, 640), dtype=np.float32) * 50
    weight = rng.standard_normal(640, dtype=np.float32)
    device = up(o, hidden)
    o.residual(device, up(o, x), up(o, weight), 1e-6)
    o.residual(device, up(o, x), None, 1e-6)
    want = hidden + ops.rms_norm(x, weight, 1e-6) + x
    assert error(down(o, device), want) < 1e-5

    logits = logits_with_edge_cases(rng, 262144)
    out = o.empty((5,), np.int32)
    o.argmax(out, up(o, logits))
    assert down(o, out).tolist() == np.argmax(logits, axis=1).tolist()

    clean = rng.standard_normal((4, 128256), dtype=np.float32)
    values, indices = o.empty((4, 40), np.float32), o.empty((4, 40), np.int32)
    o.topk(values, indices, up(o, clean), 40)
    order = np.argsort(-clean, axis=1, kind="stable")[:, :40]
    assert np.array_equal(down(o, indices), order)
    assert np.array_equal(down(o, values), np.take_along_axis(clean, order, axis=1))


CUBLAS_SHAPES = [(1, 4096, 4096), (16, 4096, 14336), (64, 14336, 4096), (300, 640, 2048),
                 (7, 640, 262144)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(("rows", "inner", "cols"), CUBLAS_SHAPES)
def test_cublas_linear_is_x_times_the_weight_transposed(device_ops, dtype, rows, inner, cols):
    o = device_ops[dtype]
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    w = rng.standard_normal((cols, inner), dtype=np.float32) * inner ** -0.5
    store = DTYPES[dtype]
    xs, ws = (bf16_bits(a) if store == np.uint16 else a.astype(store) for a in (x, w))
    out = o.empty((rows, cols), np.float32)
    o.linear(out, up(o, xs), up(o, ws))
    want = to_float32(xs).astype(np.float64) @ to_float32(ws).astype(np.float64).T
    # fp32 accumulation over `inner` products of rounded inputs, in some order
    assert error(down(o, out), want) < (1e-5 if dtype == "f32" else 1e-3)


@pytest.mark.gpu
def test_a_captured_graph_replays_on_inputs_updated_in_place(device_ops):
    o = device_ops["f16"]
    rng = np.random.default_rng(3)
    table = rng.standard_normal((1000, 256), dtype=np.float32).astype(np.float16)
    weight = (rng.standard_normal((1000, 256), dtype=np.float32) / 16).astype(np.float16)
    norm = np.ones(256, np.float32)
    d_table, d_weight, d_norm = up(o, table), up(o, weight), up(o, norm)
    tokens = o.empty((4,), np.int32)
    hidden, normed = o.empty((4, 256), np.float32), o.empty((4, 256), np.float16)
    logits, best = o.empty((4, 1000), np.float32), o.empty((4,), np.int32)

    def record():
        o.embed(hidden, d_table, tokens, 1.0)
        o.rms_norm(normed, hidden, d_norm, 1e-6)
        o.linear(logits, normed, d_weight)
        o.argmax(best, logits)

    o.upload(tokens, np.array([1, 2, 3, 4], np.int32))
    record()  # warm: modules loaded, cuBLAS handle and algorithm chosen
    o.synchronize()
    graph = o.capture(record)
    results = []
    for ids in ([5, 6, 7, 8], [9, 10, 11, 999]):
        o.upload(tokens, np.array(ids, np.int32))
        graph.replay()
        replayed = down(o, best).copy()
        record()  # the same launches, eagerly
        results.append((replayed, down(o, best).copy()))
    graph.close()
    for replayed, eager in results:
        assert np.array_equal(replayed, eager)
    assert not np.array_equal(results[0][0], results[1][0])
