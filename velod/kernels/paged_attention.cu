// velod paged-attention kernels (decode: one query token per sequence).
//
// Layouts (row-major, see velod/kernels/layout.py):
//   query, out     [num_seqs, num_heads, head_dim]                     T
//   key/value cache [num_blocks, block_size, num_kv_heads, head_dim]   T
//   block_tables   [num_seqs, max_blocks_per_seq]                      int32
//   context_lens   [num_seqs]                                          int32
//   part_out       [num_seqs, num_heads, max_parts, head_dim]          float32 (split mode)
//   part_max/sum   [num_seqs, num_heads, max_parts]                    float32 (split mode)
//
// Design (flash-decoding), shared by both attention paths:
// - A sliding window (window > 0) limits each query to its last `window` tokens: partitions
//   start at the window's first token, and blocks before it are never read.
// - One thread block per (sequence, kv head, partition of the context). The block serves all
//   query heads that share the kv head (up to a path-dependent number of them; larger groups
//   are split into head chunks along grid.y), so each K/V byte leaves device memory once.
// - K and V rows of a tile of tokens are staged in shared memory with 16-byte cp.async copies
//   (two stages: the next tile loads while this one is used). Tokens past the context are
//   zero-filled, never read, so garbage or NaN in unused slots cannot leak.
// - An online softmax (running max m, sum l, accumulator) lives in registers; scores are never
//   stored per token position. Partial results of one block are merged through shared memory.
// - Sequences longer than one partition write (o, m, l) per partition; a second kernel merges
//   them with the log-sum-exp trick. Scores are kept in the log2 domain (exp2f).
// Two paths (the same entry points, chosen at compile time per cache type):
// - Tensor cores (fp16 and bf16 caches, sm_80+, paged_attention_mma): the kv head's query heads
//   are the 16 M rows of mma.m16n8k16 tiles; each warp streams its own 16-token sub-tiles. About
//   90% of copy bandwidth on an H200 (BENCHMARKS.md).
// - CUDA cores (float32 caches, and every type below sm_80, paged_attention): a thread group of
//   kLanes lanes holds one head_dim row as 16-byte vectors, owns one query head and a strided
//   subset of the tile's tokens.
// No atomics anywhere; every output element is written by exactly one thread.

#include "common.cuh"

namespace velod {

[[maybe_unused]] constexpr int kUnroll = 4;  // tokens per online-softmax step in one group

// Which sequence, partition of its context and query heads one thread block serves.
struct BlockWork {
    int seq, part, num_parts, start, end, kv_head, head0, heads_here;
};

// The first position a sequence's query sees: 0, or ctx - window with a sliding window
// (window > 0: the token itself and the window - 1 before it). Blocks before it are never
// read, so the engine may already have freed them.
__device__ __forceinline__ int window_start(const int ctx, const int window) {
    return window > 0 ? max(ctx - window, 0) : 0;
}

// Partitions of the visible context (at least one, also for an empty context).
__device__ __forceinline__ int count_parts(const int ctx, const int lo, const int partition_size) {
    return ctx <= lo ? 1 : ceil_div(ctx - lo, partition_size);
}

// Fills w from the block index; false when the partition is past the sequence's context.
__device__ __forceinline__ bool block_work(BlockWork& w, const int* __restrict__ context_lens,
                                           const int num_heads, const int num_kv_heads,
                                           const int heads_per_block, const int partition_size,
                                           const int window) {
    w.seq = blockIdx.z;
    w.part = blockIdx.x;
    const int ctx = context_lens[w.seq];
    const int lo = window_start(ctx, window);
    w.num_parts = count_parts(ctx, lo, partition_size);
    if (w.part >= w.num_parts) return false;
    w.start = lo + w.part * partition_size;
    w.end = min(ctx, w.start + partition_size);
    const int group_size = num_heads / num_kv_heads;
    const int chunks = ceil_div(group_size, heads_per_block);
    w.kv_head = blockIdx.y / chunks;
    const int chunk = blockIdx.y % chunks;
    w.head0 = w.kv_head * group_size + chunk * heads_per_block;
    w.heads_here = min(heads_per_block, group_size - chunk * heads_per_block);
    return true;
}

// Element offset of column col of token pos's row for kv_head, through the block table.
template <int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ int64_t cache_offset(const int* __restrict__ table, const int pos,
                                                const int num_kv_heads, const int kv_head,
                                                const int col) {
    const int64_t slot =
        static_cast<int64_t>(table[pos / BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE;
    return (slot * num_kv_heads + kv_head) * HEAD_DIM + col;
}

// Merges `count` partial results of each of the block's heads (partial p of head h at index
// p * stride + h of red_m, red_l and, times HEAD_DIM, red_acc) and writes the output row, or
// this partition's (o, m, l) when the sequence is split.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_block_result(
    const float* red_m, const float* red_l, const float* red_acc, const int count,
    const int stride, const int threads, const BlockWork& w, const int num_heads,
    const int max_parts, T* __restrict__ out, float* __restrict__ part_out,
    float* __restrict__ part_max, float* __restrict__ part_sum) {
    const bool split = w.num_parts > 1;
    for (int i = threadIdx.x; i < w.heads_here * HEAD_DIM; i += threads) {
        const int h = i / HEAD_DIM;
        const int d = i % HEAD_DIM;
        float m_all = -INFINITY;
        for (int p = 0; p < count; ++p) m_all = fmaxf(m_all, red_m[p * stride + h]);
        float l_all = 0.f;
        float o = 0.f;
        for (int p = 0; p < count; ++p) {
            const int g = p * stride + h;
            const float scale = red_m[g] == -INFINITY ? 0.f : exp2f(red_m[g] - m_all);
            l_all = fmaf(red_l[g], scale, l_all);
            o = fmaf(red_acc[g * HEAD_DIM + d], scale, o);
        }
        const float result = l_all > 0.f ? o / l_all : 0.f;
        const int64_t row = static_cast<int64_t>(w.seq) * num_heads + w.head0 + h;
        if (split) {
            const int64_t slot = row * max_parts + w.part;
            part_out[slot * HEAD_DIM + d] = result;
            if (d == 0) {
                part_max[slot] = m_all;
                part_sum[slot] = l_all;
            }
        } else {
            out[row * HEAD_DIM + d] = from_float<T>(result);
        }
    }
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void paged_attention(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
    float* __restrict__ part_sum, const T* __restrict__ query,
    const T* __restrict__ key_cache, const T* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    const float scale_log2, const int num_heads, const int num_kv_heads,
    const int heads_per_block, const int max_blocks_per_seq, const int partition_size,
    const int max_parts, const int window) {
    using G = Geometry<T, HEAD_DIM>;
    constexpr int kVec = G::kVec;
    constexpr int kLanes = G::kLanes;
    constexpr int kTile = G::kTileTokens;
    constexpr int kTileVecs = kTile * G::kRowVecs;
#if defined(VELOD_HOST_EMULATION)
    unsigned char* const smem_raw = velod_emulated_smem();
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    T* const smem = reinterpret_cast<T*>(smem_raw);  // [stage][K|V][kTile][HEAD_DIM]

    BlockWork w;
    // Uniform for the block, before any barrier.
    if (!block_work(w, context_lens, num_heads, num_kv_heads, heads_per_block, partition_size,
                    window))
        return;
    const int seq = w.seq, start = w.start, end = w.end;
    const int kv_head = w.kv_head, head0 = w.head0, heads_here = w.heads_here;

    const int tid = threadIdx.x;
    const int lane = tid % kLanes;
    const int group = tid / kLanes;
    const int z_count = G::kGroups / heads_per_block;  // groups sharing one head
    const int h_local = group % heads_per_block;
    const int z = group / heads_per_block;
    const bool active = z < z_count && h_local < heads_here;
    const int head = head0 + h_local;

    float q[G::kVecsPerLane][kVec];
    float acc[G::kVecsPerLane][kVec];
#pragma unroll
    for (int v = 0; v < G::kVecsPerLane; ++v) {
        const int col = (lane + v * kLanes) * kVec;
        if (active && col < HEAD_DIM) {
            load_vec<T>(query + (static_cast<int64_t>(seq) * num_heads + head) * HEAD_DIM + col,
                        q[v]);
        } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) q[v][e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
            q[v][e] *= scale_log2;
            acc[v][e] = 0.f;
        }
    }
    float m = -INFINITY;  // running max of log2-domain scores
    float l = 0.f;        // running sum of exp2(score - m)

    const int* const table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;

    auto load_tile = [&](int tile, int stage) {
        const int t0 = start + tile * kTile;
        const int n = min(kTile, end - t0);
        T* const ks = smem + stage * 2 * kTile * HEAD_DIM;
        T* const vs = ks + kTile * HEAD_DIM;
        for (int i = tid; i < kTileVecs; i += kThreads) {
            const int tok = i / G::kRowVecs;
            const int col = (i % G::kRowVecs) * kVec;
            const bool valid = tok < n;
            const int64_t offset = valid ? cache_offset<HEAD_DIM, BLOCK_SIZE>(
                                               table, t0 + tok, num_kv_heads, kv_head, col)
                                         : 0;
            copy16_async(ks + tok * HEAD_DIM + col, key_cache + offset, valid);
            copy16_async(vs + tok * HEAD_DIM + col, value_cache + offset, valid);
        }
    };

    // Lanes of one group shuffle among themselves only: groups of a warp can diverge.
    const unsigned group_mask =
        kLanes == 32 ? 0xffffffffu
                     : (((1u << kLanes) - 1u) << ((threadIdx.x % 32) / kLanes * kLanes));

    const int num_tiles = end > start ? ceil_div(end - start, kTile) : 0;
    if (num_tiles > 0) load_tile(0, 0);
    copy_commit();
    for (int tile = 0; tile < num_tiles; ++tile) {
        if (tile + 1 < num_tiles) load_tile(tile + 1, (tile + 1) & 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        if (active) {
            const T* const ks = smem + (tile & 1) * 2 * kTile * HEAD_DIM;
            const T* const vs = ks + kTile * HEAD_DIM;
            const int n = min(kTile, end - (start + tile * kTile));
            for (int t = z; t < n; t += z_count * kUnroll) {
                float s[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int tok = t + u * z_count;
                    float partial = 0.f;
                    if (tok < n) {
#pragma unroll
                        for (int v = 0; v < G::kVecsPerLane; ++v) {
                            const int col = (lane + v * kLanes) * kVec;
                            if (col < HEAD_DIM) {
                                float k[kVec];
                                load_vec<T>(ks + tok * HEAD_DIM + col, k);
#pragma unroll
                                for (int e = 0; e < kVec; ++e) partial = fmaf(q[v][e], k[e], partial);
                            }
                        }
                    }
#pragma unroll
                    for (int off = kLanes / 2; off > 0; off /= 2)
                        partial += __shfl_xor_sync(group_mask, partial, off);
                    s[u] = tok < n ? partial : -INFINITY;
                }
                float m_new = m;
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, s[u]);  // s[0] is finite
                const float correction = exp2f(m - m_new);
                l *= correction;
#pragma unroll
                for (int v = 0; v < G::kVecsPerLane; ++v)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) acc[v][e] *= correction;
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const int tok = t + u * z_count;
                    if (tok < n) {
                        const float p = exp2f(s[u] - m_new);
                        l += p;
#pragma unroll
                        for (int v = 0; v < G::kVecsPerLane; ++v) {
                            const int col = (lane + v * kLanes) * kVec;
                            if (col < HEAD_DIM) {
                                float val[kVec];
                                load_vec<T>(vs + tok * HEAD_DIM + col, val);
#pragma unroll
                                for (int e = 0; e < kVec; ++e) acc[v][e] = fmaf(p, val[e], acc[v][e]);
                            }
                        }
                    }
                }
                m = m_new;
            }
        }
        __syncthreads();  // the next iteration refills this stage
    }
    copy_wait<0>();
    __syncthreads();

    // Merge the z_count groups of each head through shared memory (the tiles are done).
    float* const red_m = reinterpret_cast<float*>(smem_raw);
    float* const red_l = red_m + G::kGroups;
    float* const red_acc = red_l + G::kGroups;  // [kGroups][HEAD_DIM]
    if (active) {
        if (lane == 0) {
            red_m[group] = m;
            red_l[group] = l;
        }
#pragma unroll
        for (int v = 0; v < G::kVecsPerLane; ++v) {
            const int col = (lane + v * kLanes) * kVec;
            if (col < HEAD_DIM) {
#pragma unroll
                for (int e = 0; e < kVec; ++e) red_acc[group * HEAD_DIM + col + e] = acc[v][e];
            }
        }
    }
    __syncthreads();

    store_block_result<T, HEAD_DIM>(red_m, red_l, red_acc, z_count, heads_per_block, kThreads, w,
                                    num_heads, max_parts, out, part_out, part_max, part_sum);
}

// ---- tensor-core path (fp16 and bf16 caches, sm_80 and newer) ----------------------------
//
// The query heads that share a KV head are the M rows (up to 16) of mma.sync m16n8k16 tiles,
// so each K/V element is read from shared memory once for all of them and the dot products
// and the weighted sum of V run on tensor cores (fp32 accumulation), not lane by lane.
// Each warp streams its own 16-token sub-tiles of the partition (sub-tiles w, w + kWarps, ...)
// through its own two-stage cp.async buffer and keeps an online softmax for its rows; the
// warps are merged through shared memory at the end, as in the CUDA-core path.
//   S = Q·Kᵀ: A = Q (16 heads × 16 dims, registers), B = Kᵀ (ldmatrix of K rows).
//   O += P·V: A = P (the S accumulators rounded to T: FlashAttention-2's register reuse),
//             B = V (ldmatrix.trans of V rows).
// Rows of the staged tiles are padded by 16 bytes so that ldmatrix reads are conflict-free.
template <int HEAD_DIM>
struct MmaGeometry {
    static constexpr int kStride = HEAD_DIM + 8;                  // elements per staged row
    static constexpr int kWarpElems = 2 * 2 * 16 * kStride;       // 2 stages x (K, V) x 16 rows
    static constexpr int kWarpBytes = kWarpElems * 2;
    static constexpr int kWarps = cmax(1, cmin(4, 49152 / kWarpBytes));
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kSmemBytes = kWarps * kWarpBytes;
    static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16");
    static_assert(kWarps * (16 * HEAD_DIM + 32) * 4 <= kSmemBytes, "merge buffer must fit");
};

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
__device__ __forceinline__ void paged_attention_mma(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
    float* __restrict__ part_sum, const T* __restrict__ query,
    const T* __restrict__ key_cache, const T* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    const float scale_log2, const int num_heads, const int num_kv_heads,
    const int heads_per_block, const int max_blocks_per_seq, const int partition_size,
    const int max_parts, const int window) {
    using G = MmaGeometry<HEAD_DIM>;
    constexpr int kStride = G::kStride;
    constexpr int kWarps = G::kWarps;
    constexpr int kSteps = HEAD_DIM / 16;   // k-steps of S, pairs of n-tiles of O
    constexpr int kRowVecs = HEAD_DIM / 8;  // 16-byte vectors per row
#if defined(VELOD_HOST_EMULATION)
    unsigned char* const smem_raw = velod_emulated_smem();
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    BlockWork w;
    // Uniform for the block, before any barrier.
    if (!block_work(w, context_lens, num_heads, num_kv_heads, heads_per_block, partition_size,
                    window))
        return;
    const int seq = w.seq, start = w.start, end = w.end;
    const int kv_head = w.kv_head, head0 = w.head0, heads_here = w.heads_here;

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;  // fragment row (and token / dim column of B)
    const int t = lane % 4;  // fragment column pair
    T* const wsmem = reinterpret_cast<T*>(smem_raw) + warp * G::kWarpElems;

    // Q as A fragments, rows g and g + 8 (heads past heads_here are zero).
    uint32_t qa[kSteps][4];
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = g + (r & 1) * 8;
            const int col = kk * 16 + (r >> 1) * 8 + 2 * t;
            qa[kk][r] = row < heads_here
                ? *reinterpret_cast<const uint32_t*>(
                      query + (static_cast<int64_t>(seq) * num_heads + head0 + row) * HEAD_DIM +
                      col)
                : 0u;
        }
    }
    float o[2 * kSteps][4];
#pragma unroll
    for (int n = 0; n < 2 * kSteps; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[n][c] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 domain)
    float l[2] = {0.f, 0.f};              // this thread's part of the running sums

    const int* const table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;
    const int num_sub = end > start ? ceil_div(end - start, 16) : 0;
    const int mine = num_sub > warp ? ceil_div(num_sub - warp, kWarps) : 0;

    auto load_sub = [&](int i, int stage) {
        const int t0 = start + (warp + i * kWarps) * 16;
        const int n = min(16, end - t0);
        T* const ks = wsmem + stage * 2 * 16 * kStride;
        T* const vs = ks + 16 * kStride;
        for (int v = lane; v < 16 * kRowVecs; v += 32) {
            const int tok = v / kRowVecs;
            const int col = (v % kRowVecs) * 8;
            const bool valid = tok < n;
            const int64_t offset = valid ? cache_offset<HEAD_DIM, BLOCK_SIZE>(
                                               table, t0 + tok, num_kv_heads, kv_head, col)
                                         : 0;
            copy16_async(ks + tok * kStride + col, key_cache + offset, valid);
            copy16_async(vs + tok * kStride + col, value_cache + offset, valid);
        }
    };

    if (mine > 0) load_sub(0, 0);
    copy_commit();
    for (int i = 0; i < mine; ++i) {
        if (i + 1 < mine) load_sub(i + 1, (i + 1) & 1);
        copy_commit();
        copy_wait<1>();
        __syncwarp();
        const T* const ks = wsmem + (i & 1) * 2 * 16 * kStride;
        const T* const vs = ks + 16 * kStride;
        const int n = min(16, end - (start + (warp + i * kWarps) * 16));

        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
        const int mat = lane / 8;
        const int mrow = lane % 8;
#pragma unroll
        for (int kk = 0; kk < kSteps; ++kk) {
            uint32_t b[4];  // n-tile 0: b[0], b[1]; n-tile 1: b[2], b[3]
            ldmatrix_x4<false>(b, ks + ((mat / 2) * 8 + mrow) * kStride + kk * 16 + (mat % 2) * 8);
            mma16816<T>(s[0], qa[kk], b[0], b[1]);
            mma16816<T>(s[1], qa[kk], b[2], b[3]);
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int tok = j * 8 + 2 * t + (c & 1);
                s[j][c] = tok < n ? s[j][c] * scale_log2 : -INFINITY;
                mx[c >> 1] = fmaxf(mx[c >> 1], s[j][c]);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(m[r], quad_max(mx[r]));  // finite: token 0 is valid
            corr[r] = exp2f(m[r] - m_new);
            m[r] = m_new;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[j][c] = exp2f(s[j][c] - m[c >> 1]);
                l[c >> 1] += s[j][c];
            }
#pragma unroll
        for (int nt = 0; nt < 2 * kSteps; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[nt][c] *= corr[c >> 1];
        const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
        for (int nn = 0; nn < kSteps; ++nn) {
            uint32_t b[4];  // dims nn*16..+7: b[0], b[1]; dims +8..+15: b[2], b[3]
            ldmatrix_x4<true>(b, vs + ((mat % 2) * 8 + mrow) * kStride + nn * 16 + (mat / 2) * 8);
            mma16816<T>(o[2 * nn], pa, b[0], b[1]);
            mma16816<T>(o[2 * nn + 1], pa, b[2], b[3]);
        }
        __syncwarp();  // the next iteration refills this stage
    }
    copy_wait<0>();
    __syncthreads();  // every warp is done with the staging buffers

    // Merge the warps through shared memory: m, l and o of all 16 rows per warp.
    float* const red_m = reinterpret_cast<float*>(smem_raw);
    float* const red_l = red_m + kWarps * 16;
    float* const red_o = red_l + kWarps * 16;  // [kWarps][16][HEAD_DIM]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(l[r]);
        if (t == 0) {
            red_m[warp * 16 + g + r * 8] = m[r];
            red_l[warp * 16 + g + r * 8] = total;
        }
    }
#pragma unroll
    for (int nt = 0; nt < 2 * kSteps; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
            red_o[(warp * 16 + g + (c >> 1) * 8) * HEAD_DIM + nt * 8 + 2 * t + (c & 1)] = o[nt][c];
    __syncthreads();

    store_block_result<T, HEAD_DIM>(red_m, red_l, red_o, kWarps, 16, G::kThreads, w, num_heads,
                                    max_parts, out, part_out, part_max, part_sum);
}

// Threads per block of the attention kernel for (T, HEAD_DIM): layout.py mirrors it.
// min_blocks: blocks per SM that ptxas must leave room for. The CUDA-core kernel needs few
// registers, and left to itself ptxas squeezes it below 56 and spills; 8 blocks give it 64.
template <typename T, int HEAD_DIM>
struct AttentionThreads {
#if defined(VELOD_TENSOR_CORES)
    static constexpr bool kMma = sizeof(T) == 2;
#else
    static constexpr bool kMma = false;
#endif
    static constexpr int value = kMma ? MmaGeometry<HEAD_DIM>::kThreads : kThreads;
    static constexpr int min_blocks = kMma ? 1 : 8;
};

// Merges the partitions of sequences that were split; others were written directly.
template <typename T>
__device__ __forceinline__ void merge_partitions(
    T* __restrict__ out, const float* __restrict__ part_out, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const int* __restrict__ context_lens, const int num_heads,
    const int head_dim, const int partition_size, const int max_parts, const int window) {
    const int head = blockIdx.x;
    const int seq = blockIdx.y;
    const int ctx = max(context_lens[seq], 0);
    const int num_parts = count_parts(ctx, window_start(ctx, window), partition_size);
    if (num_parts <= 1) return;
    const int64_t row = static_cast<int64_t>(seq) * num_heads + head;
    const float* const pm = part_max + row * max_parts;
    const float* const ps = part_sum + row * max_parts;
    float m_all = -INFINITY;
    for (int p = 0; p < num_parts; ++p) m_all = fmaxf(m_all, pm[p]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float l_all = 0.f;
        float o = 0.f;
        for (int p = 0; p < num_parts; ++p) {
            const float w = ps[p] * exp2f(pm[p] - m_all);  // every partition has >= 1 token
            l_all += w;
            o = fmaf(w, part_out[(row * max_parts + p) * head_dim + d], o);
        }
        out[row * head_dim + d] = from_float<T>(o / l_all);
    }
}

// Copies count bytes; 16 bytes at a time when everything is 16-byte aligned.
__device__ __forceinline__ void copy_bytes(unsigned char* dst, const unsigned char* src,
                                           int64_t count) {
    const bool wide = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                        static_cast<uintptr_t>(count)) & 15u) == 0;
    if (wide) {
        uint4* const d = reinterpret_cast<uint4*>(dst);
        const uint4* const s = reinterpret_cast<const uint4*>(src);
        for (int64_t i = threadIdx.x; i < count / 16; i += blockDim.x) d[i] = s[i];
    } else {
        for (int64_t i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
    }
}

// Scatters one token's K and V rows (row_bytes each) into cache slot slot_mapping[token].
// Slots outside [0, num_slots) are skipped: negative ones are padding, and a slot past the
// cache never writes outside it even when the host did not validate a device-resident mapping.
template <typename I>
__device__ __forceinline__ void write_cache(
    unsigned char* __restrict__ key_cache, unsigned char* __restrict__ value_cache,
    const unsigned char* __restrict__ key, const unsigned char* __restrict__ value,
    const I* __restrict__ slot_mapping, const int64_t row_bytes, const int64_t key_stride,
    const int64_t value_stride, const int64_t num_slots) {
    const int64_t token = blockIdx.x;
    const int64_t slot = static_cast<int64_t>(slot_mapping[token]);
    if (slot < 0 || slot >= num_slots) return;
    if (blockIdx.y == 0) {
        copy_bytes(key_cache + slot * row_bytes, key + token * key_stride, row_bytes);
    } else {
        copy_bytes(value_cache + slot * row_bytes, value + token * value_stride, row_bytes);
    }
}

// Copies whole blocks (K in grid.y == 0, V in grid.y == 1) for (source, destination) pairs.
template <typename I>
__device__ __forceinline__ void copy_blocks(
    unsigned char* __restrict__ key_cache, unsigned char* __restrict__ value_cache,
    const I* __restrict__ pairs, const int64_t block_bytes) {
    const int64_t src = static_cast<int64_t>(pairs[2 * static_cast<int64_t>(blockIdx.x)]);
    const int64_t dst = static_cast<int64_t>(pairs[2 * static_cast<int64_t>(blockIdx.x) + 1]);
    unsigned char* const cache = blockIdx.y == 0 ? key_cache : value_cache;
    copy_bytes(cache + dst * block_bytes, cache + src * block_bytes, block_bytes);
}

}  // namespace velod

// ---- extern "C" entry points, looked up by name from velod/kernels/cuda.py ----------------

#if defined(VELOD_TENSOR_CORES)
#define VELOD_ATTENTION_BODY(T, D, BS)                                                        \
    if constexpr (sizeof(T) == 2) {                                                           \
        velod::paged_attention_mma<T, D, BS>(                                                 \
            out, part_out, part_max, part_sum, query, key_cache, value_cache, block_tables,   \
            context_lens, scale_log2, num_heads, num_kv_heads, heads_per_block,               \
            max_blocks_per_seq, partition_size, max_parts, window);                           \
    } else {                                                                                  \
        velod::paged_attention<T, D, BS>(                                                     \
            out, part_out, part_max, part_sum, query, key_cache, value_cache, block_tables,   \
            context_lens, scale_log2, num_heads, num_kv_heads, heads_per_block,               \
            max_blocks_per_seq, partition_size, max_parts, window);                           \
    }
#else
#define VELOD_ATTENTION_BODY(T, D, BS)                                                        \
    velod::paged_attention<T, D, BS>(out, part_out, part_max, part_sum, query, key_cache,     \
                                     value_cache, block_tables, context_lens, scale_log2,     \
                                     num_heads, num_kv_heads, heads_per_block,                \
                                     max_blocks_per_seq, partition_size, max_parts, window);
#endif

#define VELOD_ATTENTION(TNAME, T, D, BS)                                                      \
    extern "C" __global__ void __launch_bounds__(velod::AttentionThreads<T, D>::value,       \
                                                    velod::AttentionThreads<T, D>::min_blocks) \
        velod_paged_attention_##TNAME##_d##D##_b##BS(                                         \
            T* out, float* part_out, float* part_max, float* part_sum, const T* query,        \
            const T* key_cache, const T* value_cache, const int* block_tables,                \
            const int* context_lens, float scale_log2, int num_heads, int num_kv_heads,       \
            int heads_per_block, int max_blocks_per_seq, int partition_size, int max_parts,   \
            int window) {                                                                     \
        VELOD_ATTENTION_BODY(T, D, BS)                                                        \
    }

#define VELOD_ATTENTION_BS(TNAME, T, D) \
    VELOD_ATTENTION(TNAME, T, D, 8)     \
    VELOD_ATTENTION(TNAME, T, D, 16)    \
    VELOD_ATTENTION(TNAME, T, D, 32)

#define VELOD_ATTENTION_ALL(TNAME, T)                                                         \
    VELOD_ATTENTION_BS(TNAME, T, 64)                                                          \
    VELOD_ATTENTION_BS(TNAME, T, 80)                                                          \
    VELOD_ATTENTION_BS(TNAME, T, 96)                                                          \
    VELOD_ATTENTION_BS(TNAME, T, 112)                                                         \
    VELOD_ATTENTION_BS(TNAME, T, 128)                                                         \
    VELOD_ATTENTION_BS(TNAME, T, 256)                                                         \
    extern "C" __global__ void velod_merge_partitions_##TNAME(                                \
        T* out, const float* part_out, const float* part_max, const float* part_sum,          \
        const int* context_lens, int num_heads, int head_dim, int partition_size,             \
        int max_parts, int window) {                                                          \
        velod::merge_partitions<T>(out, part_out, part_max, part_sum, context_lens, num_heads, \
                                   head_dim, partition_size, max_parts, window);              \
    }

// -DVELOD_ONLY_F32 / _F16 / _BF16 narrow a build to one cache dtype (faster first compile).
#if !defined(VELOD_ONLY_F16) && !defined(VELOD_ONLY_BF16)
VELOD_ATTENTION_ALL(f32, float)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_BF16)
VELOD_ATTENTION_ALL(f16, __half)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_F16)
VELOD_ATTENTION_ALL(bf16, __nv_bfloat16)
#endif

#define VELOD_CACHE_OPS(INAME, I)                                                             \
    extern "C" __global__ void velod_write_cache_##INAME(                                     \
        unsigned char* key_cache, unsigned char* value_cache, const unsigned char* key,       \
        const unsigned char* value, const I* slot_mapping, long long row_bytes,               \
        long long key_stride, long long value_stride, long long num_slots) {                  \
        velod::write_cache<I>(key_cache, value_cache, key, value, slot_mapping, row_bytes,    \
                              key_stride, value_stride, num_slots);                           \
    }                                                                                         \
    extern "C" __global__ void velod_copy_blocks_##INAME(                                     \
        unsigned char* key_cache, unsigned char* value_cache, const I* pairs,                 \
        long long block_bytes) {                                                              \
        velod::copy_blocks<I>(key_cache, value_cache, pairs, block_bytes);                    \
    }

VELOD_CACHE_OPS(i32, int)
VELOD_CACHE_OPS(i64, long long)
