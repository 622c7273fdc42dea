"""The forward pass's building blocks over ``[tokens, width]`` float32 arrays.

Each is one separate step — a GEMM, a norm, a rotation, an activation, a residual add — so
that the GPU path can mirror them one for one (cuBLAS for ``linear``, a fused kernel for the
elementwise ones). Functions write in place where they say so, to keep a step's temporaries
few and small.
"""

from __future__ import annotations

import math

import numpy as np

from velod.engine.models.hparams import Rope

_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T (+ bias)`` for ``weight`` stored ``[out, in]``: one GEMM, no copy."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_t(x: np.ndarray, weight_t: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight_t`` for a weight stored transposed, ``[in, out]`` (into ``out`` if given)."""
    return np.matmul(x, weight_t, out=out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x²) + eps) · weight`` over the last axis (a new array)."""
    mean_square = np.einsum("...i,...i->...", x, x) / np.float32(x.shape[-1])
    inverse = 1.0 / np.sqrt(mean_square + np.float32(eps), dtype=np.float32)
    return (x * inverse[..., None]) * weight


def silu_gate(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU: ``silu(gate) · up`` for ``gate_up`` = ``[T, 2·ffn]`` (gate columns first)."""
    ffn = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
    out = np.negative(gate)
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.divide(gate, out, out=out)
    out *= up
    return out


def gelu_tanh_gate(gate_up: np.ndarray) -> np.ndarray:
    """GeGLU: ``gelu_tanh(gate) · up``, GELU's tanh approximation
    ``0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))``."""
    ffn = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :ffn], gate_up[:, ffn:]
    inner = gate * gate
    inner *= np.float32(0.044715)
    inner += np.float32(1.0)
    inner *= gate
    inner *= _GELU_C
    np.tanh(inner, out=inner)
    inner += np.float32(1.0)
    inner *= gate
    inner *= np.float32(0.5)
    inner *= up
    return inner


ACTIVATIONS = {"silu": silu_gate, "gelu_tanh": gelu_tanh_gate}


def rope_inverse_frequencies(rope: Rope, factors: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[dims / 2]``: scale · base^(-2i/dims) / factor_i."""
    exponents = np.arange(0, rope.dims, 2, dtype=np.float64) / rope.dims
    inverse = rope.scale / rope.base ** exponents
    if rope.has_factors and factors is not None:
        inverse = inverse / factors.astype(np.float64)
    return inverse


def rope_tables(positions: np.ndarray, inverse_frequencies: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[T, dims / 2]`` (float32) of every position's angles."""
    angles = positions.astype(np.float64)[:, None] * inverse_frequencies[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> None:
    """Rotates ``x`` ``[T, heads, head_dim]`` in place by the angles of its row's position.

    ``neox`` pairs element i with i + dims/2; ``norm`` pairs adjacent elements 2i, 2i+1.
    Elements past ``dims`` (partial rotary) are left as they are.
    """
    half = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    if style == "neox":
        first, second = x[..., :half], x[..., half:2 * half]
    else:
        first, second = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    a = first * c - second * s
    second *= c
    second += first * s
    first[...] = a
