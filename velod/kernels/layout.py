"""Array layouts, argument checks and launch geometry shared by the NumPy and CUDA paths.

Layouts (row-major, one query token per sequence):

- ``query``, output: ``[num_seqs, num_heads, head_dim]``
- ``key_cache``, ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``;
  token ``i`` of a sequence lives in block ``block_tables[s, i // block_size]`` at offset
  ``i % block_size``; its cache slot is ``block * block_size + offset``.
- ``block_tables``: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's last
  block are never read (they may hold anything).
- ``context_lens``: int32 ``[num_seqs]``; 0 gives an all-zero output row.
- ``slot_mapping``: int32 or int64 ``[num_tokens]``; a negative slot skips that token (padding).
- ``block_pairs``: int32 or int64 ``[num_pairs, 2]`` of (source, destination) block ids.

Element types: float32, float16 and bfloat16. NumPy has no bfloat16, so bfloat16 arrays travel
as uint16 bit patterns (``bf16_bits``/``bf16_to_float32`` convert). Query, caches and output
share one element type; arithmetic is float32.

Grouped-query attention: ``num_heads`` is a multiple of ``num_kv_heads`` and query head ``h``
reads kv head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUPPORTED_HEAD_DIMS = (64, 80, 96, 112, 128, 256)
SUPPORTED_BLOCK_SIZES = (8, 16, 32)
DTYPE_NAMES = {"float32": "f32", "float16": "f16", "uint16": "bf16"}  # uint16 = bfloat16 bits

# Mirrors of the constants in paged_attention.cu.
KERNEL_THREADS = 128
STAGE_BYTES = 16384
DEFAULT_PARTITION = 512
MIN_PARTITION = 64
MAX_PARTITIONS = 64


class AttentionArgumentError(ValueError):
    """Arguments whose shapes, dtypes or values the kernels cannot take."""


@dataclass(frozen=True)
class AttentionShape:
    """The sizes that one paged-attention call works with."""

    num_seqs: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks_per_seq: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class KernelGeometry:
    """Compile-time geometry of one CUDA-core kernel instantiation (``Geometry`` in the .cu)."""

    lanes: int            # threads that share one head_dim row
    groups: int           # thread groups per block = most query heads one block serves
    tile_tokens: int      # tokens per shared-memory pipeline stage
    smem_bytes: int       # dynamic shared memory per block


def _pow2_ceil(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _pow2_floor(x: int) -> int:
    return 1 if x < 2 else 1 << (x.bit_length() - 1)


def kernel_geometry(itemsize: int, head_dim: int) -> KernelGeometry:
    """Geometry of the CUDA-core attention kernel for an element size and head_dim."""
    vec = 16 // itemsize
    row_vecs = head_dim // vec
    lanes = min(32, _pow2_ceil(row_vecs))
    row_bytes = head_dim * itemsize
    tile = min(64, _pow2_floor(STAGE_BYTES // (2 * row_bytes)))
    return KernelGeometry(lanes, KERNEL_THREADS // lanes, tile, 2 * 2 * tile * row_bytes)


MMA_ROWS = 16  # query heads per tensor-core tile (the M of mma.m16n8k16)


@dataclass(frozen=True)
class MmaGeometry:
    """The tensor-core kernel's launch for a head_dim (``MmaGeometry`` in the .cu file)."""

    warps: int
    threads: int
    smem_bytes: int


def mma_geometry(head_dim: int) -> MmaGeometry:
    """Warps, threads and shared memory of the tensor-core kernel (fp16/bf16, sm_80+)."""
    warp_bytes = 2 * 2 * 16 * (head_dim + 8) * 2  # 2 stages x (K, V) x 16 padded rows
    warps = max(1, min(4, 49152 // warp_bytes))
    return MmaGeometry(warps, warps * 32, warps * warp_bytes)


@dataclass(frozen=True)
class AttentionLaunch:
    """How the CUDA backend launches one paged-attention call."""

    grid: tuple[int, int, int]  # (partitions, kv heads x head chunks, sequences)
    heads_per_block: int
    partition_size: int
    max_parts: int              # > 1: partitions are merged by the second kernel
    smem_bytes: int
    threads: int = KERNEL_THREADS


def plan_attention_launch(shape: AttentionShape, itemsize: int, max_context: int,
                          num_sms: int, partition_size: int | None = None, *,
                          tensor_cores: bool = False) -> AttentionLaunch:
    """Grid, heads per block and partitioning for a call (pure; mirrors the kernel).

    ``tensor_cores``: the device runs the tensor-core kernel (sm_80 and newer), which the
    module uses for 2-byte caches (fp16, bf16); float32 caches always take the CUDA-core one.
    """
    if tensor_cores and itemsize == 2:
        mma = mma_geometry(shape.head_dim)
        heads_per_block = min(shape.group_size, MMA_ROWS)
        threads, smem_bytes = mma.threads, mma.smem_bytes
    else:
        geometry = kernel_geometry(itemsize, shape.head_dim)
        heads_per_block = min(shape.group_size, geometry.groups)
        threads, smem_bytes = KERNEL_THREADS, geometry.smem_bytes
    chunks = -(-shape.group_size // heads_per_block)
    if partition_size is None:
        partition_size = choose_partition_size(
            max_context, shape.num_seqs * shape.num_kv_heads * chunks, num_sms)
    if partition_size < 1:
        raise AttentionArgumentError(f"partition_size must be >= 1, got {partition_size}")
    if shape.num_seqs > 65535 or shape.num_kv_heads * chunks > 65535:
        raise AttentionArgumentError("at most 65535 sequences and kv-head chunks per call")
    max_parts = max(1, -(-max_context // partition_size))
    return AttentionLaunch((max_parts, shape.num_kv_heads * chunks, shape.num_seqs),
                           heads_per_block, partition_size, max_parts, smem_bytes, threads)


PREFILL_THREADS = 128  # both prefill paths


@dataclass(frozen=True)
class PrefillLaunch:
    """How the CUDA backend launches one prefill call (``PrefillGeometry`` /
    ``PrefillMmaGeometry`` in prefill_attention.cu)."""

    grid: tuple[int, int, int]  # (row tiles, kv heads, sequences)
    rows_per_block: int         # (token, query head) rows of one kv head per block
    smem_bytes: int
    threads: int = PREFILL_THREADS


def prefill_geometry(itemsize: int, head_dim: int, *, tensor_cores: bool) -> tuple[int, int]:
    """Rows per block and shared memory of the prefill kernel for (element size, head_dim)."""
    if tensor_cores and itemsize == 2:
        stride = head_dim + 8
        tile = max(16, min(64, _pow2_floor(49152 // (2 * 2 * stride * 2))))
        return 4 * 16, 2 * 2 * tile * stride * 2
    geometry = kernel_geometry(itemsize, head_dim)
    vecs_per_lane = -(-(head_dim * itemsize // 16) // geometry.lanes)
    return geometry.groups * max(1, 4 // vecs_per_lane), geometry.smem_bytes


def plan_prefill_launch(shape: AttentionShape, itemsize: int, max_query_len: int, *,
                        tensor_cores: bool) -> PrefillLaunch:
    """Grid and shared memory of a prefill call (pure; mirrors the kernel): one block per
    ``rows_per_block`` of a sequence's (token, query head) rows for one kv head."""
    rows, smem_bytes = prefill_geometry(itemsize, shape.head_dim, tensor_cores=tensor_cores)
    tiles = max(1, -(-max_query_len * shape.group_size // rows))
    if shape.num_seqs > 65535 or shape.num_kv_heads > 65535:
        raise AttentionArgumentError("at most 65535 sequences and kv heads per prefill call")
    return PrefillLaunch((tiles, shape.num_kv_heads, shape.num_seqs), rows, smem_bytes)


def choose_partition_size(
    max_context: int, blocks_per_partition: int, num_sms: int
) -> int:
    """Tokens per partition; a value >= max_context means a single pass.

    512 tokens keeps the merge traffic under 1% of the K/V bytes and gives many thread blocks,
    so the last wave is short. Small batches use smaller partitions until there are at least
    two blocks per multiprocessor; very long contexts use larger ones so that no sequence has
    more than MAX_PARTITIONS (which bounds the workspace).
    """
    if max_context <= DEFAULT_PARTITION and blocks_per_partition >= 2 * num_sms:
        return max(max_context, 1)
    size = DEFAULT_PARTITION
    while size > MIN_PARTITION and blocks_per_partition * -(-max_context // size) < 2 * num_sms:
        size //= 2
    return max(size, _pow2_ceil(-(-max_context // MAX_PARTITIONS)))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = np.uint16(0x7FC0)
    return out


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns as float32 values."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_float32(x: np.ndarray) -> np.ndarray:
    """Any supported element type as float32 (uint16 is read as bfloat16 bits)."""
    if x.dtype == np.uint16:
        return bf16_to_float32(x)
    return np.asarray(x, dtype=np.float32)


def from_float32(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values in the given element type (uint16 = bfloat16 bits)."""
    if np.dtype(dtype) == np.uint16:
        return bf16_bits(x)
    return x.astype(dtype)


def check_attention_args(
    query, key_cache, value_cache, block_tables, context_lens
) -> AttentionShape:
    """The call's sizes, or AttentionArgumentError naming what is wrong."""
    if query.ndim != 3:
        raise AttentionArgumentError(
            f"query must be [num_seqs, num_heads, head_dim], got shape {tuple(query.shape)}")
    if key_cache.ndim != 4:
        raise AttentionArgumentError(
            "key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(key_cache.shape)}")
    if tuple(value_cache.shape) != tuple(key_cache.shape):
        raise AttentionArgumentError(
            f"value_cache shape {tuple(value_cache.shape)} differs from key_cache "
            f"{tuple(key_cache.shape)}")
    num_seqs, num_heads, head_dim = (int(n) for n in query.shape)
    num_blocks, block_size, num_kv_heads, cache_dim = (int(n) for n in key_cache.shape)
    if cache_dim != head_dim:
        raise AttentionArgumentError(
            f"query head_dim {head_dim} differs from the cache's {cache_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise AttentionArgumentError(
            f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    dtypes = {np.dtype(a.dtype) for a in (query, key_cache, value_cache)}
    if len(dtypes) != 1 or next(iter(dtypes)).name not in DTYPE_NAMES:
        raise AttentionArgumentError(
            "query, key_cache and value_cache must share one dtype of float32, float16 or "
            f"uint16 (bfloat16 bits); got {sorted(d.name for d in dtypes)}")
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
        raise AttentionArgumentError(
            f"block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq], "
            f"got shape {tuple(block_tables.shape)}")
    if tuple(context_lens.shape) != (num_seqs,):
        raise AttentionArgumentError(
            f"context_lens must be [num_seqs={num_seqs}], got shape {tuple(context_lens.shape)}")
    for name, arr in (("block_tables", block_tables), ("context_lens", context_lens)):
        if np.dtype(arr.dtype) != np.int32:
            raise AttentionArgumentError(f"{name} must be int32, got {np.dtype(arr.dtype).name}")
    return AttentionShape(num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
                          int(block_tables.shape[1]))


def check_context_lens(context_lens: np.ndarray, shape: AttentionShape) -> None:
    """Refuses lengths that are negative or need more blocks than the block table holds."""
    if context_lens.size == 0:
        return
    if int(context_lens.min()) < 0:
        raise AttentionArgumentError("context_lens must be >= 0")
    longest = int(context_lens.max())
    if math.ceil(longest / shape.block_size) > shape.max_blocks_per_seq:
        raise AttentionArgumentError(
            f"a context of {longest} tokens needs {math.ceil(longest / shape.block_size)} blocks "
            f"of {shape.block_size}, but block_tables has {shape.max_blocks_per_seq} per sequence")


def check_cache_write_args(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Refuses a write_cache call whose shapes or dtypes do not match."""
    if key_cache.ndim != 4 or tuple(value_cache.shape) != tuple(key_cache.shape):
        raise AttentionArgumentError(
            "key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, "
            f"head_dim]; got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    row = tuple(key_cache.shape[2:])
    num_tokens = slot_mapping.shape[0] if slot_mapping.ndim == 1 else -1
    for name, arr in (("key", key), ("value", value)):
        if tuple(arr.shape) != (num_tokens, *row):
            raise AttentionArgumentError(
                f"{name} must be [num_tokens={num_tokens}, {row[0]}, {row[1]}], "
                f"got shape {tuple(arr.shape)}")
        if np.dtype(arr.dtype) != np.dtype(key_cache.dtype):
            raise AttentionArgumentError(
                f"{name} dtype {np.dtype(arr.dtype).name} differs from the cache's "
                f"{np.dtype(key_cache.dtype).name}")
    if np.dtype(slot_mapping.dtype) not in (np.int32, np.int64):
        raise AttentionArgumentError(
            f"slot_mapping must be int32 or int64, got {np.dtype(slot_mapping.dtype).name}")


def check_slots(slot_mapping: np.ndarray, num_slots: int) -> None:
    """Refuses slots past the cache or used twice (negative slots are padding)."""
    used = slot_mapping[slot_mapping >= 0]
    if used.size and int(used.max()) >= num_slots:
        raise AttentionArgumentError(
            f"slot {int(used.max())} is past the cache's {num_slots} slots")
    if np.unique(used).size != used.size:
        raise AttentionArgumentError("slot_mapping names a slot twice")


def check_block_pairs(block_pairs: np.ndarray, num_blocks: int) -> None:
    """Refuses pairs out of range, or whose destinations repeat or are also sources."""
    if block_pairs.ndim != 2 or block_pairs.shape[1] != 2:
        raise AttentionArgumentError(
            f"block_pairs must be [num_pairs, 2], got shape {tuple(block_pairs.shape)}")
    if np.dtype(block_pairs.dtype) not in (np.int32, np.int64):
        raise AttentionArgumentError(
            f"block_pairs must be int32 or int64, got {np.dtype(block_pairs.dtype).name}")
    if block_pairs.size == 0:
        return
    if int(block_pairs.min()) < 0 or int(block_pairs.max()) >= num_blocks:
        raise AttentionArgumentError(f"block ids must be in [0, {num_blocks})")
    sources, destinations = block_pairs[:, 0], block_pairs[:, 1]
    if np.unique(destinations).size != destinations.size:
        raise AttentionArgumentError("a destination block appears twice in block_pairs")
    if np.intersect1d(sources, destinations).size:
        raise AttentionArgumentError("a block is both a source and a destination")


def check_prefill_args(query, key_cache, value_cache, block_tables, query_start_loc,
                       context_lens) -> AttentionShape:
    """The sizes of a prefill call (``num_seqs`` = sequences, not query rows), or
    AttentionArgumentError; query rows are ``[num_tokens, num_heads, head_dim]``."""
    if query.ndim != 3:
        raise AttentionArgumentError(
            f"query must be [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    if query_start_loc.ndim != 1 or len(query_start_loc) < 1:
        raise AttentionArgumentError("query_start_loc must be [num_seqs + 1]")
    if np.dtype(query_start_loc.dtype) != np.int32:
        raise AttentionArgumentError(
            f"query_start_loc must be int32, got {np.dtype(query_start_loc.dtype).name}")
    starts = query_start_loc.astype(np.int64)
    if starts[0] != 0 or starts[-1] != query.shape[0] or (np.diff(starts) < 0).any():
        raise AttentionArgumentError(
            f"query_start_loc must rise from 0 to num_tokens={query.shape[0]}")
    # The per-sequence checks, with one query row standing in for each sequence's chunk.
    stand_in = np.empty((len(starts) - 1, *query.shape[1:]), query.dtype)
    shape = check_attention_args(stand_in, key_cache, value_cache, block_tables, context_lens)
    check_context_lens(context_lens, shape)
    if (np.diff(starts) > context_lens).any():
        raise AttentionArgumentError("a sequence has more query rows than context tokens")
    return shape
