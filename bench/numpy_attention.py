#!/usr/bin/env python3
"""NumPy paged attention against dense matmul attention over the same tokens, side by side.

    python bench/numpy_attention.py [--repeats N] [--compare FILE] [--out FILE]

Cases (float32 cache and math, block size 16, block tables shuffled over the cache):

- ``decode_llama``: 16 sequences x 2048 context, 32 query / 8 kv heads, head_dim 128 — the
  issue's yardstick; goal: paged within 2x of dense matmul.
- ``decode_gemma3``: 32 sequences x 256 context, 4 / 1 heads, head_dim 256 (Gemma 3 270M
  decoding at batch 32), and the same with a 128-token sliding window.
- ``prefill_gemma3``: one 512-token prompt, causal, 4 / 1 heads, head_dim 256.

Dense = softmax(q·Kᵀ)·V with ``np.matmul`` over contiguous head-major K/V ``[seq, kv, n, d]``
(the grouped query heads of a kv head as the rows of one GEMM), and the same with
``np.einsum``; both read exactly the tokens the paged call reads. Each repeat times every
variant once, in turn, so machine noise hits them alike; the JSON reports the median and the
best time of each and the paged/dense ratios of both. ``--compare FILE`` races another
implementation of ``velod/kernels/reference.py`` in the decode cases too (e.g. an older one:
``git show REV:velod/kernels/reference.py > old.py``). Prints one JSON document (and writes
it to --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import emit
from velod.kernels import reference

BLOCK_SIZE = 16


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg()[0]}


def paged_cache(rng, seqs: int, context: int, kv: int, dim: int):
    """Random K/V for ``seqs`` x ``context`` tokens over shuffled blocks, plus the dense
    head-major copies ``[seqs, kv, context, dim]``."""
    per_seq = -(-context // BLOCK_SIZE)
    blocks = seqs * per_seq
    keys = rng.standard_normal((blocks, BLOCK_SIZE, kv, dim), dtype=np.float32)
    values = rng.standard_normal((blocks, BLOCK_SIZE, kv, dim), dtype=np.float32)
    tables = rng.permutation(blocks).reshape(seqs, per_seq).astype(np.int32)

    def dense(cache):
        rows = cache[tables].reshape(seqs, per_seq * BLOCK_SIZE, kv, dim)[:, :context]
        return np.ascontiguousarray(rows.transpose(0, 2, 1, 3))

    return keys, values, tables, dense(keys), dense(values)


def dense_decode(q, k, v, window):
    """q [S, kv, g, d] (scaled) over k, v [S, kv, n, d] (only the window's tokens)."""
    if window is not None:
        k, v = k[:, :, -window:], v[:, :, -window:]
    scores = np.matmul(q, k.transpose(0, 1, 3, 2))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return np.matmul(scores, v) / scores.sum(axis=-1, keepdims=True)


def dense_decode_einsum(q, k, v, window):
    if window is not None:
        k, v = k[:, :, -window:], v[:, :, -window:]
    scores = np.einsum("skgd,sknd->skgn", q, k)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    return np.einsum("skgn,sknd->skgd", scores, v) / scores.sum(axis=-1, keepdims=True)


def dense_prefill(q, k, v):
    """q [kv, n*g, d] (rows position-major) causal over k, v [kv, n, d]."""
    kv, rows, _ = q.shape
    n = k.shape[1]
    group = rows // n
    scores = np.matmul(q, k.transpose(0, 2, 1)).reshape(kv, n, group, n)
    mask = np.triu(np.ones((n, n), bool), 1)
    np.copyto(scores, -np.inf, where=mask[None, :, None, :])
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    flat = scores.reshape(kv, rows, n)
    return np.matmul(flat, v) / flat.sum(axis=-1, keepdims=True)


def race(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and best milliseconds of each variant, timed in turn ``repeats`` times (the
    best of a shared machine's runs is the one least disturbed by its neighbours)."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median": round(statistics.median(s), 3), "best": round(min(s), 3)}
            for name, s in samples.items()}


def ratio(ms: dict[str, dict[str, float]], a: str, b: str) -> dict[str, float]:
    return {k: round(ms[a][k] / ms[b][k], 3) for k in ("median", "best")}


def decode_case(name: str, seqs: int, context: int, heads: int, kv: int, dim: int,
                window: int | None, repeats: int, other: Any = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    keys, values, tables, dense_k, dense_v = paged_cache(rng, seqs, context, kv, dim)
    group = heads // kv
    scale = dim ** -0.5
    query = rng.standard_normal((seqs, heads, dim), dtype=np.float32)
    lens = np.full(seqs, context, np.int32)
    q = query.reshape(seqs, kv, group, dim) * np.float32(scale)
    paged = reference.paged_attention(query, keys, values, tables, lens, scale, window=window)
    error = float(np.abs(paged.reshape(q.shape) - dense_decode(q, dense_k, dense_v, window))
                  .max())
    variants = {
        "paged": lambda: reference.paged_attention(query, keys, values, tables, lens, scale,
                                                   window=window),
        "dense_matmul": lambda: dense_decode(q, dense_k, dense_v, window),
        "dense_einsum": lambda: dense_decode_einsum(q, dense_k, dense_v, window),
    }
    if other is not None and window is None:
        variants["compared"] = lambda: other.paged_attention(query, keys, values, tables, lens,
                                                             scale)
    ms = race(variants, repeats)
    result = {"case": name, "seqs": seqs, "context": context, "heads": heads, "kv_heads": kv,
              "head_dim": dim, "window": window, "ms": ms,
              "paged_over_dense_matmul": ratio(ms, "paged", "dense_matmul"),
              "paged_over_dense_einsum": ratio(ms, "paged", "dense_einsum"),
              "max_abs_difference": error}
    if "compared" in ms:
        result["compared_over_dense_matmul"] = ratio(ms, "compared", "dense_matmul")
    return result


def prefill_case(name: str, tokens: int, heads: int, kv: int, dim: int,
                 repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    keys, values, tables, dense_k, dense_v = paged_cache(rng, 1, tokens, kv, dim)
    group = heads // kv
    scale = dim ** -0.5
    query = rng.standard_normal((tokens, heads, dim), dtype=np.float32)
    starts = np.array([0, tokens], np.int32)
    lens = np.array([tokens], np.int32)
    q = (query.reshape(tokens, kv, group, dim) * np.float32(scale)).transpose(1, 0, 2, 3)
    q = np.ascontiguousarray(q).reshape(kv, tokens * group, dim)

    def dense():
        return dense_prefill(q, dense_k[0], dense_v[0])

    def paged():
        return reference.paged_prefill_attention(query, keys, values, tables, starts, lens,
                                                 scale)

    expected = dense().reshape(kv, tokens, group, dim).transpose(1, 0, 2, 3)
    error = float(np.abs(paged().reshape(tokens, kv, group, dim) - expected).max())
    ms = race({"paged": paged, "dense_matmul": dense}, repeats)
    return {"case": name, "tokens": tokens, "heads": heads, "kv_heads": kv, "head_dim": dim,
            "ms": ms, "paged_over_dense_matmul": ratio(ms, "paged", "dense_matmul"),
            "max_abs_difference": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another reference.py to race")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    other = None
    if args.compare:
        import importlib.util

        spec = importlib.util.spec_from_file_location("compared_reference", args.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
    results = [
        decode_case("decode_llama", 16, 2048, 32, 8, 128, None, args.repeats, other),
        decode_case("decode_gemma3", 32, 256, 4, 1, 256, None, args.repeats, other),
        decode_case("decode_gemma3_window128", 32, 256, 4, 1, 256, 128, args.repeats),
        prefill_case("prefill_gemma3", 512, 4, 1, 256, args.repeats),
    ]
    doc = {"benchmark": "numpy_attention", "machine": machine(), "block_size": BLOCK_SIZE,
           "compared": str(args.compare) if args.compare else None,
           "dtype": "float32", "repeats": args.repeats, "results": results}
    emit(doc, args.out)


if __name__ == "__main__":
    main()
