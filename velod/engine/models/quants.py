"""GGML tensor data to float32: F32, F16, BF16, the legacy 32-element quants and the k-quants.

Each format is a row of fixed-size blocks; ``dequantize`` decodes them a chunk of blocks at a
time straight into the caller's preallocated float32 output, so the temporaries stay a few
MB whatever the tensor's size. The arithmetic follows ggml's reference ``dequantize_row_*``
(ggml-quants.c) step for step: scale products are formed in float32 in the same order, so
the values equal llama.cpp's own dequantization.

Block layouts (little-endian, ``half`` = IEEE float16):

====== ===== ======================================================================
type   elems bytes: fields in order
====== ===== ======================================================================
Q4_0   32    18: d half, qs[16] (low nibbles elements 0-15, high nibbles 16-31)
Q4_1   32    20: d half, m half, qs[16]
Q5_0   32    22: d half, qh u32 (bit j = 5th bit of element j), qs[16]
Q5_1   32    24: d half, m half, qh u32, qs[16]
Q8_0   32    34: d half, qs int8[32]
Q2_K   256   84: scales[16] (4-bit scale | 4-bit min), qs[64] (2-bit), d half, dmin half
Q3_K   256   110: hmask[32], qs[64] (2-bit), scales[12] (16 × 6-bit), d half
Q4_K   256   144: d half, dmin half, scales[12] (8 × 6-bit scale + min), qs[128]
Q5_K   256   176: d half, dmin half, scales[12], qh[32], qs[128]
Q6_K   256   210: ql[128], qh[64], scales int8[16], d half
====== ===== ======================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK_ELEMENTS = 1 << 20  # elements decoded per pass: ~4 MB of output, a few MB of temporaries


class UnsupportedQuantization(ValueError):
    """A tensor type this module cannot decode; the message lists the ones it can."""


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 ``[blocks, 1]``."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes ``[n, k]`` → ``[n, 2, k]``: low nibbles, then high nibbles."""
    return np.stack((qs & 0x0F, qs >> 4), axis=1)


# ---------------------------------------------------------------- 32-element blocks


def _q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _half(blocks, 0)
    q = _nibbles(blocks[:, 2:18]).reshape(-1, 32).astype(np.int8) - np.int8(8)
    np.multiply(q, d, out=out)


def _q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[:, 4:20]).reshape(-1, 32)
    np.multiply(q, d, out=out)
    out += m


def _five_bit(qh_bytes: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit values 0..31 of Q5_0/Q5_1 blocks, ``[n, 32]`` uint8."""
    qh = qh_bytes.copy().view("<u4")                                  # [n, 1]
    high = (qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)      # [n, 32]
    return _nibbles(qs).reshape(-1, 32) | (high.astype(np.uint8) << 4)


def _q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _half(blocks, 0)
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:22]).astype(np.int8) - np.int8(16)
    np.multiply(q, d, out=out)


def _q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _five_bit(blocks[:, 4:8], blocks[:, 8:24])
    np.multiply(q, d, out=out)
    out += m


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    d = _half(blocks, 0)
    np.multiply(blocks[:, 2:34].view(np.int8), d, out=out)


# ---------------------------------------------------------------- k-quants (256 elements)


def _q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Element h*128 + j*32 + s*16 + l: bits 2j.. of qs[h*32 + s*16 + l], scale h*8 + j*2 + s.
    scales = blocks[:, 0:16].reshape(-1, 2, 4, 2, 1)
    qs = blocks[:, 16:80].reshape(-1, 2, 1, 2, 16)
    d, dmin = _half(blocks, 80), _half(blocks, 82)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1, 1)
    q = (qs >> shifts) & np.uint8(3)                                   # [n, 2, 4, 2, 16]
    dl = d[:, :, None, None, None] * (scales & np.uint8(0x0F))
    ml = dmin[:, :, None, None, None] * (scales >> np.uint8(4))
    view = out.reshape(-1, 2, 4, 2, 16)
    np.multiply(dl, q, out=view)
    view -= ml


def _q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales of Q3_K blocks (``raw`` = the 12 scale bytes), ``[n, 16]``."""
    i = np.arange(16)
    low = (raw[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & np.uint8(0x0F)
    high = (raw[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & np.uint8(3)
    return (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)


def _q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Element h*128 + j*32 + s*16 + l: bits 2j.. of qs[h*32 + s*16 + l], minus 4 unless bit
    # h*4 + j of hmask[s*16 + l] is set; scale h*8 + j*2 + s.
    hmask = blocks[:, 0:32].reshape(-1, 1, 1, 2, 16)
    qs = blocks[:, 32:96].reshape(-1, 2, 1, 2, 16)
    scales = _q3_k_scales(blocks[:, 96:108]).reshape(-1, 2, 4, 2, 1)
    d = _half(blocks, 108)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1, 1)
    bits = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1, 1)
    q = ((qs >> shifts) & np.uint8(3)).astype(np.int8)
    q -= (((hmask >> bits) & np.uint8(1)) ^ np.uint8(1)).astype(np.int8) << np.int8(2)
    dl = d[:, :, None, None, None] * scales
    np.multiply(dl, q, out=out.reshape(-1, 2, 4, 2, 16))


def _k4_scales_mins(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of Q4_K/Q5_K blocks (``raw`` = 12 bytes), ``[n, 8]``."""
    scale = np.empty((raw.shape[0], 8), np.uint8)
    minimum = np.empty((raw.shape[0], 8), np.uint8)
    scale[:, :4] = raw[:, 0:4] & np.uint8(63)
    minimum[:, :4] = raw[:, 4:8] & np.uint8(63)
    scale[:, 4:] = (raw[:, 8:12] & np.uint8(0x0F)) | ((raw[:, 0:4] >> np.uint8(6)) << np.uint8(4))
    minimum[:, 4:] = (raw[:, 8:12] >> np.uint8(4)) | ((raw[:, 4:8] >> np.uint8(6)) << np.uint8(4))
    return scale, minimum


def _q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Element c*64 + nib*32 + l: nibble nib of qs[c*32 + l], scale/min 2c + nib.
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scale, minimum = _k4_scales_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144].reshape(-1, 4, 32).reshape(-1, 32)).reshape(-1, 4, 2, 32)
    _k_affine(q, d, dmin, scale, minimum, out)


def _q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # As Q4_K, plus bit 2c + nib of qh[l] as the fifth bit.
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scale, minimum = _k4_scales_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48].reshape(-1, 1, 1, 32)
    bits = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    q = _nibbles(blocks[:, 48:176].reshape(-1, 32)).reshape(-1, 4, 2, 32)
    q |= ((qh >> bits) & np.uint8(1)) << np.uint8(4)
    _k_affine(q, d, dmin, scale, minimum, out)


def _k_affine(q: np.ndarray, d: np.ndarray, dmin: np.ndarray, scale: np.ndarray,
              minimum: np.ndarray, out: np.ndarray) -> None:
    """out = (d·scale)·q − dmin·min over ``[n, 4, 2, 32]`` (ggml's order of operations)."""
    d1 = (d * scale).reshape(-1, 4, 2, 1)
    m1 = (dmin * minimum).reshape(-1, 4, 2, 1)
    view = out.reshape(-1, 4, 2, 32)
    np.multiply(d1, q, out=view)
    view -= m1


def _q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Element h*128 + k*32 + l: nibble k//2 of ql[h*64 + (k%2)*32 + l], bits 2k.. of
    # qh[h*32 + l] as bits 4-5, minus 32; scale h*8 + k*2 + l//16.
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).reshape(-1, 2, 4, 2, 1)
    d = _half(blocks, 208)
    low = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)) & np.uint8(0x0F)
    low = low.reshape(-1, 2, 4, 32)                                  # k = nibble*2 + half
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))
    q = (low | ((high & np.uint8(3)) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = d[:, :, None, None, None] * scales                          # [n, 2, 4, 2, 1]
    np.multiply(dl, q.reshape(-1, 2, 4, 2, 16), out=out.reshape(-1, 2, 4, 2, 16))


# ---------------------------------------------------------------- plain floats


def _f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float32)


def _f16(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.view(np.float16)


def _bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    out.view(np.uint32)[...] = blocks.view(np.uint16).astype(np.uint32) << np.uint32(16)


# name -> (elements per block, bytes per block, decoder over [blocks, bytes] -> [blocks, elems])
FORMATS: dict[str, tuple[int, int, Callable[[np.ndarray, np.ndarray], None]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16),
    "BF16": (1, 2, _bf16),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q2_K": (256, 84, _q2_k),
    "Q3_K": (256, 110, _q3_k),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}


def check_supported(ggml_type: str) -> tuple[int, int]:
    """(elements, bytes) per block of ``ggml_type``; UnsupportedQuantization if unknown."""
    try:
        block, size, _ = FORMATS[ggml_type]
    except KeyError:
        raise UnsupportedQuantization(
            f"tensor type {ggml_type} is not supported; supported: {', '.join(FORMATS)}"
        ) from None
    return block, size


def dequantize(data: np.ndarray, ggml_type: str, out: np.ndarray,
               chunk_elements: int = CHUNK_ELEMENTS) -> np.ndarray:
    """Decodes raw GGML bytes (uint8, any shape) into ``out`` (float32, C-contiguous, any
    shape holding the tensor's element count); returns ``out``."""
    check_supported(ggml_type)
    block, size, decode = FORMATS[ggml_type]
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array")
    raw = data.reshape(-1)
    flat = out.reshape(-1)  # a view, since out is C-contiguous
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    nblocks = flat.size // block
    if nblocks * block != flat.size or raw.size != nblocks * size:
        raise ValueError(f"{ggml_type}: {raw.size} bytes do not hold {flat.size} elements "
                         f"({block} per block of {size} bytes)")
    step = max(1, chunk_elements // block)
    for first in range(0, nblocks, step):
        last = min(first + step, nblocks)
        blocks = raw[first * size:last * size].reshape(last - first, size)
        decode(blocks, flat[first * block:last * block].reshape(last - first, block))
    return out
