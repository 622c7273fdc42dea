"""The CUDA kernels' own source, run on the CPU by ``kernel_emulator.cpp``, against NumPy.

No GPU is needed: each CUDA thread is an OS thread, barriers and warp shuffles are emulated and
cp.async copies land only at wait_group. Buffers are exactly sized and the emulator is built
with AddressSanitizer, so a read outside any array aborts; unused cache slots hold NaN and the
output starts as NaN, so a stray read or a missed write shows up in the comparison.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

from tests.unit.kernels.attention_cases import (
    TOLERANCE,
    dense_attention,
    make_case,
    relative_error,
)
from tests.unit.kernels.conftest import NEEDS_EMULATOR, run_emulator
from velod.kernels import reference
from velod.kernels.cuda import attention_kernel_name
from velod.kernels.layout import (
    DTYPE_NAMES,
    check_attention_args,
    from_float32,
    kernel_geometry,
    plan_attention_launch,
    to_float32,
)

DTYPE_OF = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
pytestmark = NEEDS_EMULATOR


def run_attention(binary: Path, workdir: Path, case, partition_size: int | None,
                  window: int | None = None) -> np.ndarray:
    """The kernels' output for a case, with the launch the CUDA backend would make."""
    query = case.query
    shape = check_attention_args(query, case.key_cache, case.value_cache, case.block_tables,
                                 case.context_lens)
    max_context = int(case.context_lens.max())
    # The launch the CUDA backend makes on an sm_80+ device (the emulator runs the tensor-core
    # path for fp16/bf16); partition_size None = its automatic choice for a
    # 132-SM device (so small test batches split into partitions, as on an H100).
    plan = plan_attention_launch(shape, query.dtype.itemsize, max_context, num_sms=132,
                                 partition_size=partition_size, tensor_cores=True)
    params = {
        "num_seqs": shape.num_seqs, "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
        "heads_per_block": plan.heads_per_block, "grid_y": plan.grid[1],
        "max_blocks_per_seq": shape.max_blocks_per_seq, "partition_size": plan.partition_size,
        "max_parts": plan.max_parts, "smem_bytes": plan.smem_bytes, "threads": plan.threads,
        "scale_log2": case.scale * math.log2(math.e), "window": window or 0,
    }
    kernel = attention_kernel_name(query.dtype, shape.head_dim, shape.block_size)
    run_emulator(binary, "attention", kernel, workdir, params,
                 {name: getattr(case, name) for name in ("query", "key_cache", "value_cache",
                                                        "block_tables", "context_lens")})
    return np.fromfile(workdir / "out.bin", dtype=query.dtype).reshape(query.shape)


# (lengths, kv heads, group, head_dim, block_size, partition_size): GQA, MQA, MHA, every
# head_dim and block size, lengths 1 and around block and partition boundaries.
CASES = [
    ([1, 15, 16, 17], 2, 4, 128, 16, None),
    ([63, 64, 65, 200], 2, 4, 128, 16, 64),
    ([1, 31, 130], 1, 8, 64, 8, 32),
    ([40, 7], 2, 3, 80, 32, 16),
    ([100], 1, 16, 96, 16, None),       # group 16 > 8 heads per block: two head chunks
    ([33, 90], 4, 1, 112, 8, 40),       # MHA; partition not a multiple of the tile
    ([129, 5], 1, 2, 256, 32, 64),
    ([0, 3], 1, 2, 64, 16, None),       # an empty context gives zeros
    ([5, 77, 300], 2, 4, 128, 32, 4096),  # one partition: the single-pass path
]


@pytest.mark.parametrize("dtype", sorted(DTYPE_OF))
@pytest.mark.parametrize("case_args", CASES, ids=lambda c: f"{c[0]}-kv{c[1]}g{c[2]}d{c[3]}b{c[4]}")
def test_emulated_kernel_matches_numpy(emulators, tmp_path, dtype, case_args):
    lengths, kv, group, head_dim, block_size, partition_size = case_args
    seed = int.from_bytes(hashlib.sha256(repr((case_args, dtype)).encode()).digest()[:4], "big")
    case = make_case(np.random.default_rng(seed), lengths, kv, group, head_dim, block_size,
                     dtype)
    binary = emulators[DTYPE_NAMES[np.dtype(DTYPE_OF[dtype]).name]]
    out = run_attention(binary, tmp_path, case, partition_size)
    expected = dense_attention(case)
    assert relative_error(out, expected) < TOLERANCE[dtype]
    numpy_out = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                          case.block_tables, case.context_lens, case.scale)
    assert relative_error(out, reference_as_float64(numpy_out)) < 2 * TOLERANCE[dtype]


def reference_as_float64(x: np.ndarray) -> np.ndarray:
    return to_float32(x).astype(np.float64)


def forget_blocks_before_windows(case, window: int) -> None:
    """Poisons what a windowed decode query never sees, as an engine that freed those blocks
    would leave it: whole blocks before each sequence's window get NaN and an invalid table
    entry (a read of either shows up as NaN in the output, or as an ASan abort)."""
    nan = from_float32(np.full((), np.nan, np.float32), case.key_cache.dtype)
    block_size = case.key_cache.shape[1]
    for seq, length in enumerate(case.context_lens.tolist()):
        for b in range(max(length - window, 0) // block_size):
            case.key_cache[case.block_tables[seq, b]] = nan
            case.value_cache[case.block_tables[seq, b]] = nan
            case.block_tables[seq, b] = 2**31 - 1


# (lengths, kv heads, group, head_dim, block_size, partition_size, window): the window inside
# one partition, across partitions, longer than some contexts, and of one token.
WINDOW_CASES = [
    ([1, 20, 70, 150], 2, 4, 128, 16, 64, 37),
    ([200, 33], 1, 8, 64, 8, 32, 100),
    ([90, 5], 2, 2, 256, 32, None, 64),
    ([17, 40], 1, 4, 80, 16, None, 1),
]


@pytest.mark.parametrize("dtype", sorted(DTYPE_OF))
@pytest.mark.parametrize("case_args", WINDOW_CASES,
                         ids=lambda c: f"{c[0]}-kv{c[1]}g{c[2]}d{c[3]}b{c[4]}w{c[6]}")
def test_emulated_decode_with_a_sliding_window_reads_only_the_window(emulators, tmp_path,
                                                                     dtype, case_args):
    lengths, kv, group, head_dim, block_size, partition_size, window = case_args
    seed = int.from_bytes(hashlib.sha256(repr((case_args, dtype)).encode()).digest()[:4], "big")
    case = make_case(np.random.default_rng(seed), lengths, kv, group, head_dim, block_size,
                     dtype)
    expected = reference.paged_attention(case.query, case.key_cache, case.value_cache,
                                         case.block_tables, case.context_lens, case.scale,
                                         window=window)
    forget_blocks_before_windows(case, window)
    binary = emulators[DTYPE_NAMES[np.dtype(DTYPE_OF[dtype]).name]]
    out = run_attention(binary, tmp_path, case, partition_size, window)
    assert relative_error(out, reference_as_float64(expected)) < 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_emulated_write_cache_and_copy_blocks_are_exact(emulators, tmp_path, index_type):
    rng = np.random.default_rng(7)
    binary = emulators["f16"]
    key_cache = np.full((6, 16, 2, 80), np.nan, np.float16)
    value_cache = key_cache.copy()
    slots = rng.choice(6 * 16, size=20, replace=False).astype(index_type)
    slots[[3, 11]] = -1
    key = rng.standard_normal((20, 2, 80)).astype(np.float16)
    value = rng.standard_normal((20, 2, 80)).astype(np.float16)
    expected_k, expected_v = key_cache.copy(), value_cache.copy()
    reference.write_cache(key, value, expected_k, expected_v, slots)
    # A slot past the cache (an unvalidated device mapping) is skipped, never written.
    slots[3] = 6 * 16 + 5
    for name, arr in (("key", key), ("value", value), ("index", slots)):
        arr.tofile(tmp_path / f"{name}.bin")
    suffix = "i32" if index_type == np.int32 else "i64"
    written_k, written_v = run_cache_kernel(
        binary, "write_cache", f"velod_write_cache_{suffix}", tmp_path, key_cache, value_cache,
        f"row_bytes {2 * 80 * 2}\nnum_tokens 20\nnum_slots {6 * 16}\n")
    assert np.array_equal(written_k, expected_k, equal_nan=True)
    assert np.array_equal(written_v, expected_v, equal_nan=True)

    pairs = np.array([[0, 4], [2, 1], [5, 3]], dtype=index_type)
    reference.copy_blocks(expected_k, expected_v, pairs)
    pairs.tofile(tmp_path / "index.bin")
    copied_k, copied_v = run_cache_kernel(
        binary, "copy_blocks", f"velod_copy_blocks_{suffix}", tmp_path, written_k, written_v,
        f"block_bytes {16 * 2 * 80 * 2}\nnum_pairs 3\n")
    assert np.array_equal(copied_k, expected_k, equal_nan=True)
    assert np.array_equal(copied_v, expected_v, equal_nan=True)


def run_cache_kernel(binary: Path, mode: str, kernel: str, folder: Path, key_cache: np.ndarray,
                     value_cache: np.ndarray, params: str) -> tuple[np.ndarray, np.ndarray]:
    """Run a cache kernel in the emulator over these caches; returns the caches it wrote."""
    key_cache.tofile(folder / "key_cache.bin")
    value_cache.tofile(folder / "value_cache.bin")
    (folder / "params.txt").write_text(params)
    subprocess.run([str(binary), mode, kernel, str(folder)], check=True, capture_output=True,
                   timeout=120)
    return tuple(np.fromfile(folder / f"{name}.out", key_cache.dtype).reshape(key_cache.shape)
                 for name in ("key_cache", "value_cache"))  # type: ignore[return-value]

def test_geometry_mirror_matches_the_launch_the_emulator_checks():
    # The emulator launches with the Python mirror's smem size; ASan aborts if it is too small.
    assert astuple(kernel_geometry(2, 128))[3] == 2 * 2 * 32 * 256
    assert from_float32(np.float32([1.0]), np.uint16).dtype == np.uint16
