"""model_ops.cu's fused element-wise kernels, run on the CPU emulator, against the NumPy ops
of the CPU forward (``velod.engine.models.ops``).

Every output buffer starts poisoned (NaN bytes) and every buffer is exactly sized (the emulator
runs under AddressSanitizer), so a missed write or a stray access fails. Where the kernel and
NumPy do the same float32 operations the result must be equal; where sums run in another order,
it must agree within float32 rounding, then one rounding to the output type.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import velod.engine.models.ops as ops
from tests.unit.kernels.conftest import NEEDS_EMULATOR, run_emulator
from velod.engine.models.hparams import Rope
from velod.kernels.layout import from_float32, to_float32

pytestmark = NEEDS_EMULATOR
STORE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
# ‖kernel − numpy‖ / ‖numpy‖: float32 summation order, then one rounding to the output type.
TOLERANCE = {"f32": 2e-6, "f16": 1e-3, "bf16": 8e-3}


def poisoned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """All bytes 0xFF: NaN for floating types, -1 for integers."""
    return np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, 0xFF,
                   np.uint8).view(dtype).reshape(shape)


def run_op(emulators, tmp_path, name: str, dtype: str, params: dict,
           arrays: dict[str, np.ndarray], outputs: dict[str, tuple[tuple[int, ...], object]]
           ) -> dict[str, np.ndarray]:
    """Runs kernel ``name`` of the ``dtype`` module; returns the outputs it wrote."""
    arrays = {**arrays, **{k: poisoned(shape, t) for k, (shape, t) in outputs.items()}}
    run_emulator(emulators[dtype], "ops", name, tmp_path, params, arrays)
    return {k: np.fromfile(tmp_path / f"{k}.out", t).reshape(shape)
            for k, (shape, t) in outputs.items()}


def error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = to_float32(got).astype(np.float64), to_float32(want).astype(np.float64)
    assert not np.isnan(got).any(), "NaN in the output: an element was not written"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("dtype", sorted(STORE))
def test_embedding_gather_scales_rows_and_zeroes_tokens_out_of_range(emulators, tmp_path, dtype):
    rng = np.random.default_rng(1)
    table = from_float32(rng.standard_normal((50, 96), dtype=np.float32), STORE[dtype])
    tokens = np.array([0, 49, 7, 50, -1, 7], np.int32)
    scale = np.float32(math.sqrt(96))
    out = run_op(emulators, tmp_path, "embed", dtype,
                 {"rows": 6, "width": 96, "vocab": 50, "scale": float(scale)},
                 {"table": table, "tokens": tokens}, {"hidden": ((6, 96), np.float32)})["hidden"]
    want = to_float32(table).take(np.clip(tokens, 0, 49), axis=0) * scale
    want[[3, 4]] = 0.0
    assert np.array_equal(out, want)  # the same float32 multiply, element by element


@pytest.mark.parametrize("dtype", sorted(STORE))
@pytest.mark.parametrize("n", [640, 300, 4096])
def test_rms_norm_matches_numpy(emulators, tmp_path, dtype, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n), dtype=np.float32) * 3
    weight = rng.standard_normal(n, dtype=np.float32) + 1
    out = run_op(emulators, tmp_path, "rms_norm", dtype,
                 {"rows": 5, "n": n, "in_stride": n, "eps": 1e-6},
                 {"x": x, "weight": weight}, {"out": ((5, n), STORE[dtype])})["out"]
    want = from_float32(ops.rms_norm(x, weight, 1e-6), STORE[dtype])
    assert error(out, want) < TOLERANCE[dtype]


def test_rms_norm_reads_strided_and_gathered_rows(emulators, tmp_path):
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((6, 200), dtype=np.float32)  # rows of 200, the first 64 used
    weight = rng.standard_normal(64, dtype=np.float32)
    index = np.array([5, 0, 3], np.int32)
    out = run_op(emulators, tmp_path, "rms_norm", "f32",
                 {"rows": 3, "n": 64, "in_stride": 200, "eps": 1e-5},
                 {"x": wide, "weight": weight, "index": index},
                 {"out": ((3, 64), np.float32)})["out"]
    assert error(out, ops.rms_norm(wide[index, :64], weight, 1e-5)) < TOLERANCE["f32"]


# (heads, kv_heads, head_dim, rope: (dims, base, scale, style), factors, bias, qk_norm)
QKV_CASES = {
    "gemma3": (4, 1, 256, (256, 1e6, 1.0, "neox"), False, False, True),
    "llama3": (8, 2, 64, (64, 5e5, 1.0, "norm"), True, False, False),
    "qwen2": (6, 2, 128, (128, 1e6, 1.0, "neox"), False, True, False),
    "partial": (4, 4, 80, (32, 1e4, 0.25, "neox"), False, True, True),
}


def expected_qkv(qkv_rows, positions, heads, kv_heads, dim, rope, factors, bias, q_norm,
                 k_norm, eps):
    """TransformerModel.layer_qkv's arithmetic on a fused GEMM output (float32)."""
    rows = qkv_rows + bias if bias is not None else qkv_rows.copy()
    count = rows.shape[0]
    q = rows[:, :heads * dim].reshape(count, heads, dim)
    k = rows[:, heads * dim:(heads + kv_heads) * dim].reshape(count, kv_heads, dim)
    v = rows[:, (heads + kv_heads) * dim:].reshape(count, kv_heads, dim)
    if q_norm is not None:
        q, k = ops.rms_norm(q, q_norm, eps), ops.rms_norm(k, k_norm, eps)
    cos, sin = ops.rope_tables(positions, ops.rope_inverse_frequencies(rope, factors))
    ops.apply_rope(q, cos, sin, rope.style)
    ops.apply_rope(k, cos, sin, rope.style)
    return q, k, v


@pytest.mark.parametrize("dtype", sorted(STORE))
@pytest.mark.parametrize("arch", sorted(QKV_CASES))
def test_qkv_bias_head_norms_and_rope_match_the_numpy_layer(emulators, tmp_path, dtype, arch):
    heads, kv_heads, dim, (dims, base, scale, style), has_factors, has_bias, qk_norm = \
        QKV_CASES[arch]
    rng = np.random.default_rng(len(arch))
    rope = Rope(dims, base, scale, style, has_factors)
    factors = (rng.uniform(1, 8, dims // 2).astype(np.float32) if has_factors else None)
    width = (heads + 2 * kv_heads) * dim
    count = 5
    qkv_rows = rng.standard_normal((count, width), dtype=np.float32)
    bias = rng.standard_normal(width, dtype=np.float32) if has_bias else None
    q_norm = rng.standard_normal(dim, dtype=np.float32) + 1 if qk_norm else None
    k_norm = rng.standard_normal(dim, dtype=np.float32) + 1 if qk_norm else None
    positions = np.array([0, 1, 17, 5000, 131071], np.int32)  # large: float64 angles matter
    arrays = {"qkv": qkv_rows, "positions": positions,
              "inv_freq": ops.rope_inverse_frequencies(rope, factors)}
    for name, value in (("bias", bias), ("q_norm", q_norm), ("k_norm", k_norm)):
        if value is not None:
            arrays[name] = value
    store = STORE[dtype]
    got = run_op(emulators, tmp_path, "qkv", dtype,
                 {"rows": count, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                  "rope_dims": dims, "neox": int(style == "neox"), "eps": 1e-6}, arrays,
                 {"q": ((count, heads, dim), store), "k": ((count, kv_heads, dim), store),
                  "v": ((count, kv_heads, dim), store)})
    want = expected_qkv(qkv_rows, positions, heads, kv_heads, dim, rope, factors, bias,
                        q_norm, k_norm, 1e-6)
    for name, expected in zip("qkv", want, strict=True):
        assert error(got[name], from_float32(expected, store)) < TOLERANCE[dtype], name


@pytest.mark.parametrize("post_norm", [False, True])
def test_residual_adds_the_branch_or_its_rms_norm(emulators, tmp_path, post_norm):
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((3, 640), dtype=np.float32)
    x = rng.standard_normal((3, 640), dtype=np.float32) * 50
    weight = rng.standard_normal(640, dtype=np.float32)
    arrays = {"x": x, "hidden": hidden, **({"weight": weight} if post_norm else {})}
    run_emulator(emulators["f32"], "ops", "residual", tmp_path,
                 {"rows": 3, "n": 640, "eps": 1e-6}, arrays)  # hidden is read and written
    got = np.fromfile(tmp_path / "hidden.out", np.float32).reshape(3, 640)
    want = hidden + (ops.rms_norm(x, weight, 1e-6) if post_norm else x)
    assert error(got, want) < TOLERANCE["f32"]
    if not post_norm:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", sorted(STORE))
@pytest.mark.parametrize("name", ["silu_gate", "gelu_gate"])
def test_gated_activations_match_numpy(emulators, tmp_path, dtype, name):
    rng = np.random.default_rng(5)
    gate_up = rng.standard_normal((7, 2 * 333), dtype=np.float32) * 1.5  # the curved part
    out = run_op(emulators, tmp_path, name, dtype, {"rows": 7, "ffn": 333, "blocks": 3},
                 {"gate_up": gate_up}, {"out": ((7, 333), STORE[dtype])})["out"]
    numpy_op = ops.silu_gate if name == "silu_gate" else ops.gelu_tanh_gate
    # float32: the same formula, so only libm's last bits differ
    tolerance = 1e-6 if dtype == "f32" else TOLERANCE[dtype]
    assert error(out, from_float32(numpy_op(gate_up), STORE[dtype])) < tolerance


def logits_with_edge_cases(rng, vocab: int) -> np.ndarray:
    logits = rng.standard_normal((5, vocab), dtype=np.float32)
    logits[1, [17, 900]] = 50.0                 # a tie: the first index wins
    logits[2, [300, 40]] = np.nan                # NaN counts as largest, first one wins
    logits[3] = -np.inf                          # nothing finite: index 0
    logits[4, vocab - 1] = 1e30                  # the last element
    return logits


def test_argmax_is_numpys_argmax(emulators, tmp_path):
    logits = logits_with_edge_cases(np.random.default_rng(6), 1000)
    out = run_op(emulators, tmp_path, "argmax", "f32", {"rows": 5, "vocab": 1000},
                 {"logits": logits}, {"out": ((5,), np.int32)})["out"]
    assert out.tolist() == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_gives_the_k_largest_in_order_and_its_first_is_the_argmax(emulators, tmp_path, k):
    rng = np.random.default_rng(k)
    logits = rng.standard_normal((4, 3000), dtype=np.float32)
    logits[1, [5, 2999, 77]] = 9.0  # equal values come out by index
    got = run_op(emulators, tmp_path, "topk", "f32", {"rows": 4, "vocab": 3000, "k": k},
                 {"logits": logits}, {"values": ((4, k), np.float32),
                                      "indices": ((4, k), np.int32)})
    for row in range(4):
        order = np.lexsort((np.arange(3000), -logits[row]))[:k]
        assert got["indices"][row].tolist() == order.tolist()
        assert np.array_equal(got["values"][row], logits[row, order])
    assert got["indices"][:, 0].tolist() == np.argmax(logits, axis=1).tolist()
