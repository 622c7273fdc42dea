"""The forward pass's GEMMs: every row count takes the same arithmetic, whichever BLAS call
(one GEMV per row for a few rows, one GEMM beyond) does it."""

from __future__ import annotations

import numpy as np
import pytest

from velod.engine.models import ops


@pytest.mark.parametrize("rows", range(1, 9))
def test_linear_equals_float64_math_for_any_number_of_rows(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    weight = rng.standard_normal((80, 96)).astype(np.float32)
    bias = rng.standard_normal(80).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    got = ops.linear(x, weight, bias)
    assert got.dtype == np.float32 and got.shape == (rows, 80)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", range(1, 9))
def test_linear_t_fills_the_given_buffer_for_any_number_of_rows(rows):
    rng = np.random.default_rng(10 + rows)
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    weight_t = rng.standard_normal((64, 300)).astype(np.float32)
    out = np.full((rows, 300), np.nan, np.float32)
    got = ops.linear_t(x, weight_t, out=out)
    assert got is out or np.shares_memory(got, out)
    assert np.allclose(out, x.astype(np.float64) @ weight_t, rtol=1e-5, atol=1e-4)
