"""The paged prefill kernel's CUDA source, run on the CPU emulator, against NumPy.

Each case packs sequences of different lengths in one launch (whole prompts, chunks that end a
longer context, one-row chunks), with the launch the CUDA backend makes on an sm_80+ device:
tensor cores for fp16/bf16, CUDA cores for fp32. Unused cache slots hold NaN and the output
starts as NaN; with a sliding window, blocks before every query's window are poisoned and
their table entries made invalid, as if the engine had freed them.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from tests.unit.kernels.attention_cases import TOLERANCE, make_case, relative_error
from tests.unit.kernels.conftest import NEEDS_EMULATOR, run_emulator
from tests.unit.test_attention_prefill import dense_chunks
from velod.kernels import reference
from velod.kernels.cuda import prefill_kernel_name
from velod.kernels.layout import (
    DTYPE_NAMES,
    check_prefill_args,
    from_float32,
    plan_prefill_launch,
    to_float32,
)

pytestmark = NEEDS_EMULATOR
DTYPE_OF = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def run_prefill(binary: Path, workdir: Path, case, query: np.ndarray, starts: np.ndarray,
                window: int | None) -> np.ndarray:
    """The kernel's output for a prefill case, launched as the CUDA backend launches it."""
    shape = check_prefill_args(query, case.key_cache, case.value_cache, case.block_tables,
                               starts, case.context_lens)
    plan = plan_prefill_launch(shape, query.dtype.itemsize, int(np.diff(starts).max()),
                               tensor_cores=True)
    params = {"num_seqs": shape.num_seqs, "num_heads": shape.num_heads,
              "num_kv_heads": shape.num_kv_heads, "max_blocks_per_seq": shape.max_blocks_per_seq,
              "block_size": shape.block_size, "window": window or 0, "grid_x": plan.grid[0],
              "threads": plan.threads, "smem_bytes": plan.smem_bytes,
              "scale_log2": case.scale * math.log2(math.e)}
    arrays = {"query": query, "key_cache": case.key_cache, "value_cache": case.value_cache,
              "block_tables": case.block_tables, "query_start_loc": starts,
              "context_lens": case.context_lens}
    run_emulator(binary, "prefill", prefill_kernel_name(query.dtype, shape.head_dim), workdir,
                 params, arrays)
    return np.fromfile(workdir / "out.bin", dtype=query.dtype).reshape(query.shape)


def forget_blocks_before_windows(case, query_lens: list[int], window: int) -> None:
    """NaN and an invalid table entry for every block wholly before the window of a
    sequence's first query: what an engine that frees out-of-window blocks leaves behind."""
    nan = from_float32(np.full((), np.nan, np.float32), case.key_cache.dtype)
    block_size = case.key_cache.shape[1]
    for seq, (length, count) in enumerate(zip(case.context_lens.tolist(), query_lens,
                                              strict=True)):
        earliest = max(length - count - window + 1, 0)
        for b in range(earliest // block_size):
            case.key_cache[case.block_tables[seq, b]] = nan
            case.value_cache[case.block_tables[seq, b]] = nan
            case.block_tables[seq, b] = 2**31 - 1


# (context lengths, query rows per sequence, kv heads, group, head_dim, block_size, window)
CASES = [
    ([40, 17, 64], [40, 5, 1], 2, 4, 128, 16, None),   # whole prompt, chunk, one decode row
    ([100, 33], [30, 33], 1, 8, 64, 8, 24),            # window inside the chunk and before it
    ([70], [70], 1, 4, 256, 16, None),                 # Gemma 3 270M's shape: 4 heads on 1
    ([50, 80], [50, 17], 1, 4, 256, 32, 32),           # ... with its sliding window
    ([65, 16], [65, 16], 4, 1, 96, 16, None),          # MHA: rows cross 64-row tiles
    ([129], [48], 2, 3, 80, 8, None),                  # odd group: a token's heads span tiles
    ([30, 1], [30, 1], 2, 2, 112, 32, 1),              # a window of one token
    ([0, 20], [0, 20], 1, 2, 64, 16, 7),               # an empty sequence beside a full one
]


@pytest.mark.parametrize("dtype", sorted(DTYPE_OF))
@pytest.mark.parametrize("case_args", CASES,
                         ids=lambda c: f"{c[0]}q{c[1]}-kv{c[2]}g{c[3]}d{c[4]}b{c[5]}w{c[6]}")
def test_emulated_prefill_matches_numpy_and_dense_attention(emulators, tmp_path, dtype,
                                                            case_args):
    lengths, query_lens, kv, group, head_dim, block_size, window = case_args
    seed = int.from_bytes(hashlib.sha256(repr((case_args, dtype)).encode()).digest()[:4], "big")
    rng = np.random.default_rng(seed)
    case = make_case(rng, lengths, kv, group, head_dim, block_size, dtype)
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    query = from_float32(rng.standard_normal((int(starts[-1]), kv * group, head_dim),
                                             dtype=np.float32), case.query.dtype)
    expected = reference.paged_prefill_attention(query, case.key_cache, case.value_cache,
                                                 case.block_tables, starts, case.context_lens,
                                                 case.scale, window=window)
    dense = dense_chunks(case, query, query_lens, window)
    if window is not None:
        forget_blocks_before_windows(case, query_lens, window)
    binary = emulators[DTYPE_NAMES[np.dtype(DTYPE_OF[dtype]).name]]
    out = run_prefill(binary, tmp_path, case, query, starts, window)
    assert relative_error(out, dense) < TOLERANCE[dtype]
    assert relative_error(out, to_float32(expected).astype(np.float64)) < 2 * TOLERANCE[dtype]
