// velod paged prefill attention: causal attention of whole prompt chunks, many sequences of
// different lengths packed in one launch, over the paged KV cache.
//
// Layouts (row-major, see velod/kernels/layout.py):
//   query, out       [num_tokens, num_heads, head_dim]                   T
//   key/value cache  [num_blocks, block_size, num_kv_heads, head_dim]    T
//   block_tables     [num_seqs, max_blocks_per_seq]                      int32
//   query_start_loc  [num_seqs + 1]                                      int32
//   context_lens     [num_seqs]                                          int32
// Sequence s owns query rows query_start_loc[s] .. query_start_loc[s+1]-1: the last tokens of
// its first context_lens[s], whose K/V the engine has already written to the cache this
// step. The query at position p sees positions 0..p, or with a sliding window (window > 0)
// p - window + 1..p. NumPy twin: velod.kernels.reference.paged_prefill_attention.
//
// Design (FlashAttention-2 over a paged cache):
// - One thread block per (row tile, kv head, sequence). A sequence's rows for one kv head are
//   its (token, query head of the group) pairs, token-major; a block takes kRows of them, so
//   every K/V byte it stages serves all query heads of the group and several tokens.
// - Keys from the first one any of the block's rows sees to the last row's own position are
//   staged tile by tile in shared memory with 16-byte cp.async copies (two stages); positions
//   past that range are zero-filled, never read, so NaN in unused slots cannot leak, and with a
//   window, blocks before it are never read (the engine may have freed them).
// - An online softmax per row in registers (log2 domain); a row whose keys in a tile are all
//   masked keeps its running state. Each row is owned by exactly one warp or lane group, so no
//   merge is needed and every output element is written once.
// Two paths, chosen at compile time per cache type:
// - Tensor cores (fp16, bf16, sm_80+): each warp owns 16 rows as the M rows of mma.m16n8k16;
//   S = Q·Kᵀ and O += P·V run on tensor cores (fp32 accumulators), K and V read with ldmatrix.
// - CUDA cores (fp32, and every type below sm_80): a group of kLanes lanes holds one head row;
//   each group owns kRowsPerGroup rows and walks the staged tokens one by one.

#include "common.cuh"

namespace velod {

// Which rows of which sequence a block serves, and the key positions they see.
struct PrefillWork {
    int seq, kv_head, group, q0, first_pos, row0, row_end, lo, hi;
};

// Fills w from the block index; false when the tile is past the sequence's rows.
__device__ __forceinline__ bool prefill_work(PrefillWork& w, const int* __restrict__ query_start_loc,
                                             const int* __restrict__ context_lens,
                                             const int num_heads, const int num_kv_heads,
                                             const int rows_per_block, const int window) {
    w.seq = blockIdx.z;
    w.kv_head = blockIdx.y;
    w.group = num_heads / num_kv_heads;
    w.q0 = query_start_loc[w.seq];
    const int qlen = query_start_loc[w.seq + 1] - w.q0;
    const int rows = qlen * w.group;
    w.row0 = blockIdx.x * rows_per_block;
    if (w.row0 >= rows) return false;
    w.row_end = min(rows, w.row0 + rows_per_block);
    w.first_pos = context_lens[w.seq] - qlen;  // position of the chunk's first token
    const int pos_first = w.first_pos + w.row0 / w.group;
    const int pos_last = w.first_pos + (w.row_end - 1) / w.group;
    w.lo = window > 0 ? max(pos_first - window + 1, 0) : 0;
    w.hi = pos_last + 1;
    return true;
}

// Row r's query position, or -1 when r is past the block's rows.
__device__ __forceinline__ int row_position(const PrefillWork& w, const int r) {
    return r < w.row_end ? w.first_pos + r / w.group : -1;
}

// Element offset of row r's query (or output) vector.
__device__ __forceinline__ int64_t row_offset(const PrefillWork& w, const int r,
                                              const int num_heads, const int head_dim) {
    const int64_t token = w.q0 + r / w.group;
    return (token * num_heads + w.kv_head * w.group + r % w.group) * head_dim;
}

// Whether the query at position qpos sees the key at kpos (qpos < 0: a padding row).
__device__ __forceinline__ bool visible(const int qpos, const int kpos, const int window) {
    return qpos >= 0 && kpos <= qpos && (window <= 0 || kpos > qpos - window);
}

// Stages keys [t0, min(t0 + tile, hi)) of one kv head (K and V rows of stride elements) into
// ks and vs; rows past hi are zero-filled. Every thread of the block takes part.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void stage_keys(T* ks, T* vs, const int stride, const int tile,
                                           const int t0, const int hi,
                                           const T* __restrict__ key_cache,
                                           const T* __restrict__ value_cache,
                                           const int* __restrict__ table, const int block_size,
                                           const int num_kv_heads, const int kv_head) {
    constexpr int kRowVecs = HEAD_DIM * static_cast<int>(sizeof(T)) / 16;
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    for (int i = threadIdx.x; i < tile * kRowVecs; i += blockDim.x) {
        const int tok = i / kRowVecs;
        const int col = (i % kRowVecs) * kVec;
        const int pos = t0 + tok;
        const bool valid = pos < hi;
        int64_t offset = 0;
        if (valid) {
            const int64_t slot =
                static_cast<int64_t>(table[pos / block_size]) * block_size + pos % block_size;
            offset = (slot * num_kv_heads + kv_head) * HEAD_DIM + col;
        }
        copy16_async(ks + tok * stride + col, key_cache + offset, valid);
        copy16_async(vs + tok * stride + col, value_cache + offset, valid);
    }
}

// ---- CUDA-core path ----------------------------------------------------------------------

template <typename T, int HEAD_DIM>
struct PrefillGeometry {
    using G = Geometry<T, HEAD_DIM>;
    static constexpr int kRowsPerGroup = cmax(1, 4 / G::kVecsPerLane);
    static constexpr int kRows = G::kGroups * kRowsPerGroup;  // rows per block
    static constexpr int kTile = G::kTileTokens;
    static constexpr int kSmemBytes = G::kSmemBytes;
};

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void prefill_attention(
    T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const int* __restrict__ block_tables,
    const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,
    const float scale_log2, const int num_heads, const int num_kv_heads,
    const int max_blocks_per_seq, const int block_size, const int window) {
    using P = PrefillGeometry<T, HEAD_DIM>;
    using G = typename P::G;
    constexpr int kVec = G::kVec;
    constexpr int kLanes = G::kLanes;
    constexpr int kTile = P::kTile;
    constexpr int kRpg = P::kRowsPerGroup;
#if defined(VELOD_HOST_EMULATION)
    unsigned char* const smem_raw = velod_emulated_smem();
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    T* const smem = reinterpret_cast<T*>(smem_raw);  // [stage][K|V][kTile][HEAD_DIM]

    PrefillWork w;
    if (!prefill_work(w, query_start_loc, context_lens, num_heads, num_kv_heads, P::kRows,
                      window))
        return;  // uniform for the block, before any barrier
    const int lane = threadIdx.x % kLanes;
    const int grp = threadIdx.x / kLanes;
    const unsigned group_mask =
        kLanes == 32 ? 0xffffffffu
                     : (((1u << kLanes) - 1u) << ((threadIdx.x % 32) / kLanes * kLanes));

    // Rows grp, grp + kGroups, ...: queries (scaled into the log2 domain) and accumulators.
    int qpos[kRpg];
    float q[kRpg][G::kVecsPerLane][kVec];
    float acc[kRpg][G::kVecsPerLane][kVec];
    float m[kRpg], l[kRpg];
    int last_pos = -1;  // the group's last query position: later keys are never seen
#pragma unroll
    for (int i = 0; i < kRpg; ++i) {
        const int r = w.row0 + grp + i * G::kGroups;
        qpos[i] = row_position(w, r);
        last_pos = max(last_pos, qpos[i]);
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int v = 0; v < G::kVecsPerLane; ++v) {
            const int col = (lane + v * kLanes) * kVec;
            if (qpos[i] >= 0 && col < HEAD_DIM) {
                load_vec<T>(query + row_offset(w, r, num_heads, HEAD_DIM) + col, q[i][v]);
            } else {
#pragma unroll
                for (int e = 0; e < kVec; ++e) q[i][v][e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
                q[i][v][e] *= scale_log2;
                acc[i][v][e] = 0.f;
            }
        }
    }

    const int* const table = block_tables + static_cast<int64_t>(w.seq) * max_blocks_per_seq;
    const int num_tiles = ceil_div(w.hi - w.lo, kTile);
    auto load = [&](int tile, int stage) {
        T* const ks = smem + stage * 2 * kTile * HEAD_DIM;
        stage_keys<T, HEAD_DIM>(ks, ks + kTile * HEAD_DIM, HEAD_DIM, kTile, w.lo + tile * kTile,
                                w.hi, key_cache, value_cache, table, block_size, num_kv_heads,
                                w.kv_head);
    };
    if (num_tiles > 0) load(0, 0);
    copy_commit();
    for (int tile = 0; tile < num_tiles; ++tile) {
        if (tile + 1 < num_tiles) load(tile + 1, (tile + 1) & 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        const T* const ks = smem + (tile & 1) * 2 * kTile * HEAD_DIM;
        const T* const vs = ks + kTile * HEAD_DIM;
        const int t0 = w.lo + tile * kTile;
        // Uniform per lane group (its shuffles involve only its own lanes).
        const int n = min(min(kTile, w.hi - t0), last_pos - t0 + 1);
        for (int tok = 0; tok < n; ++tok) {
            const int kpos = t0 + tok;
            float k[G::kVecsPerLane][kVec], val[G::kVecsPerLane][kVec];
#pragma unroll
            for (int v = 0; v < G::kVecsPerLane; ++v) {
                const int col = (lane + v * kLanes) * kVec;
                if (col < HEAD_DIM) {
                    load_vec<T>(ks + tok * HEAD_DIM + col, k[v]);
                    load_vec<T>(vs + tok * HEAD_DIM + col, val[v]);
                } else {
#pragma unroll
                    for (int e = 0; e < kVec; ++e) k[v][e] = val[v][e] = 0.f;
                }
            }
#pragma unroll
            for (int i = 0; i < kRpg; ++i) {
                float s = 0.f;
#pragma unroll
                for (int v = 0; v < G::kVecsPerLane; ++v)
#pragma unroll
                    for (int e = 0; e < kVec; ++e) s = fmaf(q[i][v][e], k[v][e], s);
#pragma unroll
                for (int off = kLanes / 2; off > 0; off /= 2)
                    s += __shfl_xor_sync(group_mask, s, off);
                if (!visible(qpos[i], kpos, window)) continue;
                const float m_new = fmaxf(m[i], s);
                const float corr = exp2f(m[i] - m_new);
                const float p = exp2f(s - m_new);
                l[i] = fmaf(l[i], corr, p);
#pragma unroll
                for (int v = 0; v < G::kVecsPerLane; ++v)
#pragma unroll
                    for (int e = 0; e < kVec; ++e)
                        acc[i][v][e] = fmaf(acc[i][v][e], corr, p * val[v][e]);
                m[i] = m_new;
            }
        }
        __syncthreads();  // the next iteration refills this stage
    }
    copy_wait<0>();

#pragma unroll
    for (int i = 0; i < kRpg; ++i) {
        if (qpos[i] < 0) continue;
        T* const row = out + row_offset(w, w.row0 + grp + i * G::kGroups, num_heads, HEAD_DIM);
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
        for (int v = 0; v < G::kVecsPerLane; ++v) {
            const int col = (lane + v * kLanes) * kVec;
            if (col < HEAD_DIM) {
#pragma unroll
                for (int e = 0; e < kVec; ++e) row[col + e] = from_float<T>(acc[i][v][e] * inv);
            }
        }
    }
}

// ---- tensor-core path (fp16 and bf16 caches, sm_80 and newer) ----------------------------
//
// Warp w of the block owns rows row0 + 16 w .. + 15 as the M rows of mma.m16n8k16 (A = Q in
// registers, loaded once). The block stages kTile keys per stage for all warps; each warp
// walks them 16 at a time: S = Q·Kᵀ (B = K rows through ldmatrix), mask, online softmax,
// O += P·V (A = P rounded to T, B = V rows through ldmatrix.trans). A warp skips 16-key steps
// that none of its rows sees (all after its last row, or all before its first row's window).
// Staged rows are padded by 16 bytes so that ldmatrix reads are conflict-free.

template <int HEAD_DIM>
struct PrefillMmaGeometry {
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRows = kWarps * 16;                       // rows per block
    static constexpr int kStride = HEAD_DIM + 8;                    // elements per staged row
    static constexpr int kTile =                                    // keys per stage
        cmax(16, cmin(64, pow2_floor(49152 / (2 * 2 * kStride * 2))));
    static constexpr int kSmemBytes = 2 * 2 * kTile * kStride * 2;  // 2 stages x (K, V)
    static_assert(HEAD_DIM % 16 == 0, "head_dim must be a multiple of 16");
};

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void prefill_attention_mma(
    T* __restrict__ out, const T* __restrict__ query, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const int* __restrict__ block_tables,
    const int* __restrict__ query_start_loc, const int* __restrict__ context_lens,
    const float scale_log2, const int num_heads, const int num_kv_heads,
    const int max_blocks_per_seq, const int block_size, const int window) {
    using G = PrefillMmaGeometry<HEAD_DIM>;
    constexpr int kStride = G::kStride;
    constexpr int kTile = G::kTile;
    constexpr int kSteps = HEAD_DIM / 16;  // k-steps of S, pairs of n-tiles of O
#if defined(VELOD_HOST_EMULATION)
    unsigned char* const smem_raw = velod_emulated_smem();
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    T* const smem = reinterpret_cast<T*>(smem_raw);  // [stage][K|V][kTile][kStride]

    PrefillWork w;
    if (!prefill_work(w, query_start_loc, context_lens, num_heads, num_kv_heads, G::kRows,
                      window))
        return;  // uniform for the block, before any barrier
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;  // fragment row (and key / dim column of B)
    const int t = lane % 4;  // fragment column pair
    const int wrow0 = w.row0 + warp * 16;

    // This thread's two fragment rows (g and g + 8) and the warp's position range.
    int qpos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) qpos[i] = row_position(w, wrow0 + g + 8 * i);
    const bool warp_active = wrow0 < w.row_end;
    const int warp_first = warp_active ? w.first_pos + wrow0 / w.group : 0;
    const int warp_last = warp_active ? w.first_pos + (min(wrow0 + 16, w.row_end) - 1) / w.group
                                      : -1;

    // Q as A fragments: a[r] holds row g + 8 (r & 1), columns 8 (r >> 1) + 2t and + 1.
    uint32_t qa[kSteps][4];
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = wrow0 + g + (r & 1) * 8;
            const int col = kk * 16 + (r >> 1) * 8 + 2 * t;
            qa[kk][r] = qpos[r & 1] >= 0
                ? *reinterpret_cast<const uint32_t*>(
                      query + row_offset(w, row, num_heads, HEAD_DIM) + col)
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

    const int* const table = block_tables + static_cast<int64_t>(w.seq) * max_blocks_per_seq;
    const int num_tiles = ceil_div(w.hi - w.lo, kTile);
    auto load = [&](int tile, int stage) {
        T* const ks = smem + stage * 2 * kTile * kStride;
        stage_keys<T, HEAD_DIM>(ks, ks + kTile * kStride, kStride, kTile, w.lo + tile * kTile,
                                w.hi, key_cache, value_cache, table, block_size, num_kv_heads,
                                w.kv_head);
    };
    const int mat = lane / 8;
    const int mrow = lane % 8;
    if (num_tiles > 0) load(0, 0);
    copy_commit();
    for (int tile = 0; tile < num_tiles; ++tile) {
        if (tile + 1 < num_tiles) load(tile + 1, (tile + 1) & 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        const T* const ks_tile = smem + (tile & 1) * 2 * kTile * kStride;
        const T* const vs_tile = ks_tile + kTile * kStride;
        const int t0 = w.lo + tile * kTile;
        for (int sub = 0; sub < kTile / 16; ++sub) {
            const int k0 = t0 + sub * 16;
            // Warp-uniform: keys this warp's rows cannot see (or past the staged range).
            if (k0 >= w.hi || k0 > warp_last) break;
            if (window > 0 && k0 + 15 <= warp_first - window) continue;
            const T* const ks = ks_tile + sub * 16 * kStride;
            const T* const vs = vs_tile + sub * 16 * kStride;
            float s[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[j][c] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kSteps; ++kk) {
                uint32_t b[4];  // n-tile 0: b[0], b[1]; n-tile 1: b[2], b[3]
                ldmatrix_x4<false>(b, ks + ((mat / 2) * 8 + mrow) * kStride + kk * 16 +
                                          (mat % 2) * 8);
                mma16816<T>(s[0], qa[kk], b[0], b[1]);
                mma16816<T>(s[1], qa[kk], b[2], b[3]);
            }
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int kpos = k0 + j * 8 + 2 * t + (c & 1);
                    s[j][c] = visible(qpos[c >> 1], kpos, window) ? s[j][c] * scale_log2
                                                                  : -INFINITY;
                    mx[c >> 1] = fmaxf(mx[c >> 1], s[j][c]);
                }
            float corr[2], base[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(m[r], quad_max(mx[r]));
                // A row that has seen nothing yet stays at -inf: exponents are taken from 0.
                base[r] = m_new == -INFINITY ? 0.f : m_new;
                corr[r] = exp2f(m[r] - base[r]);
                m[r] = m_new;
                l[r] *= corr[r];
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[j][c] = exp2f(s[j][c] - base[c >> 1]);
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
                ldmatrix_x4<true>(b, vs + ((mat % 2) * 8 + mrow) * kStride + nn * 16 +
                                         (mat / 2) * 8);
                mma16816<T>(o[2 * nn], pa, b[0], b[1]);
                mma16816<T>(o[2 * nn + 1], pa, b[2], b[3]);
            }
        }
        __syncthreads();  // the next iteration refills this stage
    }
    copy_wait<0>();

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float total = quad_sum(l[r]);
        inv[r] = total > 0.f ? 1.f / total : 0.f;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (qpos[r] < 0) continue;
        T* const row = out + row_offset(w, wrow0 + g + 8 * r, num_heads, HEAD_DIM);
#pragma unroll
        for (int nt = 0; nt < 2 * kSteps; ++nt) {
            const int d = nt * 8 + 2 * t;
            *reinterpret_cast<uint32_t*>(row + d) =
                pack2<T>(o[nt][2 * r] * inv[r], o[nt][2 * r + 1] * inv[r]);
        }
    }
}

}  // namespace velod

// ---- extern "C" entry points, looked up by name from velod/kernels/cuda.py ----------------
// Both paths run 128 threads; rows per block and shared memory come from layout.py's mirror
// (prefill_geometry).

#if defined(VELOD_TENSOR_CORES)
#define VELOD_PREFILL_BODY(T, D)                                                              \
    if constexpr (sizeof(T) == 2) {                                                           \
        velod::prefill_attention_mma<T, D>(out, query, key_cache, value_cache, block_tables,  \
                                           query_start_loc, context_lens, scale_log2,         \
                                           num_heads, num_kv_heads, max_blocks_per_seq,       \
                                           block_size, window);                               \
    } else {                                                                                  \
        velod::prefill_attention<T, D>(out, query, key_cache, value_cache, block_tables,      \
                                       query_start_loc, context_lens, scale_log2, num_heads,  \
                                       num_kv_heads, max_blocks_per_seq, block_size, window); \
    }
#else
#define VELOD_PREFILL_BODY(T, D)                                                              \
    velod::prefill_attention<T, D>(out, query, key_cache, value_cache, block_tables,          \
                                   query_start_loc, context_lens, scale_log2, num_heads,      \
                                   num_kv_heads, max_blocks_per_seq, block_size, window);
#endif

#define VELOD_PREFILL(TNAME, T, D)                                                            \
    extern "C" __global__ void __launch_bounds__(velod::kThreads)                             \
        velod_prefill_attention_##TNAME##_d##D(                                               \
            T* out, const T* query, const T* key_cache, const T* value_cache,                 \
            const int* block_tables, const int* query_start_loc, const int* context_lens,     \
            float scale_log2, int num_heads, int num_kv_heads, int max_blocks_per_seq,        \
            int block_size, int window) {                                                     \
        VELOD_PREFILL_BODY(T, D)                                                              \
    }

#define VELOD_PREFILL_ALL(TNAME, T) \
    VELOD_PREFILL(TNAME, T, 64)     \
    VELOD_PREFILL(TNAME, T, 80)     \
    VELOD_PREFILL(TNAME, T, 96)     \
    VELOD_PREFILL(TNAME, T, 112)    \
    VELOD_PREFILL(TNAME, T, 128)    \
    VELOD_PREFILL(TNAME, T, 256)

// -DVELOD_ONLY_F32 / _F16 / _BF16 narrow a build to one cache dtype (faster first compile).
#if !defined(VELOD_ONLY_F16) && !defined(VELOD_ONLY_BF16)
VELOD_PREFILL_ALL(f32, float)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_BF16)
VELOD_PREFILL_ALL(f16, __half)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_F16)
VELOD_PREFILL_ALL(bf16, __nv_bfloat16)
#endif
