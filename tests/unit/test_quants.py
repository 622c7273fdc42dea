"""velod's dequantization against gguf.quants (llama.cpp's Python package), type by type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from velod.engine.models.quants import (
    FORMATS,
    UnsupportedQuantization,
    check_supported,
    dequantize,
)

# Byte offsets of every float16 field in a block: scales must be finite (random bytes would
# make some of them NaN or inf, which says nothing about the decoding).
HALF_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def random_blocks(rng: np.random.Generator, type_name: str, blocks: int) -> np.ndarray:
    """Random raw bytes of ``blocks`` blocks, every half-precision scale a finite value."""
    if type_name == "F32":
        return rng.standard_normal(blocks, dtype=np.float32).view(np.uint8)
    if type_name == "F16":
        return rng.standard_normal(blocks).astype(np.float16).view(np.uint8)
    if type_name == "BF16":
        return (rng.standard_normal(blocks).astype(np.float32).view(np.uint32) >> 16
                ).astype(np.uint16).view(np.uint8)
    _, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, (blocks, size), dtype=np.uint8)
    for offset in HALF_FIELDS[type_name]:
        halves = rng.uniform(-2, 2, blocks).astype(np.float16)
        raw[:, offset:offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def reference(raw: np.ndarray, type_name: str) -> np.ndarray:
    qtype = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return raw.view(np.float32)
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    _, size = GGML_QUANT_SIZES[qtype]
    return gguf.quants.dequantize(raw.reshape(-1, size), qtype).reshape(-1)


@pytest.mark.parametrize("type_name", list(FORMATS))
def test_dequantize_equals_gguf_quants(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    raw = random_blocks(rng, type_name, 300)
    block, _ = check_supported(type_name)
    out = np.empty(300 * block, np.float32)
    dequantize(raw, type_name, out, chunk_elements=7 * block)  # chunks that end mid-tensor
    expected = reference(raw, type_name)
    assert np.isfinite(expected).all()
    # Same operations in the same order as ggml: equal up to float32 rounding.
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-30)


def test_dequantize_fills_a_matrix_in_place_row_block_by_row_block():
    rng = np.random.default_rng(1)
    first, second = random_blocks(rng, "Q4_K", 4), random_blocks(rng, "Q8_0", 32)
    out = np.full((8, 256), np.nan, np.float32)
    dequantize(first, "Q4_K", out[:4])
    dequantize(second, "Q8_0", out[4:])
    np.testing.assert_allclose(out[:4].reshape(-1), reference(first, "Q4_K"), rtol=1e-6)
    np.testing.assert_allclose(out[4:].reshape(-1), reference(second, "Q8_0"), rtol=1e-6)


def test_unknown_type_names_the_supported_ones():
    with pytest.raises(UnsupportedQuantization, match=r"IQ2_XXS is not supported.*Q4_K"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", np.empty(256, np.float32))


def test_size_mismatch_and_bad_output_are_refused():
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", np.empty(32, np.float32))
    with pytest.raises(ValueError, match="float32"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", np.empty(32, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", np.empty((32, 2), np.float32)[:, 0])
