// velod's fused element-wise kernels for a transformer forward on the GPU: the device twins of
// velod/engine/models/ops.py (the NumPy path), one kernel per step between two GEMMs.
//
// The residual stream ("hidden") and every GEMM output are float32; what a GEMM reads (normed
// activations, the gated MLP input) and the KV cache are T (f32, f16 or bf16, the module's
// -DVELOD_ONLY_* type, suffix _f32/_f16/_bf16). Norm weights are float32.
//
//   velod_embed_T         hidden[r] = table[tokens[r]] * scale          (a token out of range: 0)
//   velod_rms_norm_T      out[r] = x[index[r] or r] / rms · weight      (strided input rows)
//   velod_qkv_T           q, k, v of one layer from its fused GEMM output: + bias, per-head
//                         RMSNorm of q and k, RoPE (NORM or NEOX, partial, per-layer
//                         frequencies with any scaling folded in), cast to the cache type
//   velod_residual        hidden += x, or hidden += rms_norm(x) · weight (Gemma's post-norms)
//   velod_silu_gate_T     silu(gate) · up                             (SwiGLU)
//   velod_gelu_gate_T     gelu_tanh(gate) · up                        (GeGLU)
//   velod_argmax          the first index of each row's maximum (NaN counts as largest), as
//                         NumPy's argmax
//   velod_topk            each row's k largest (value, index), descending, ties by index
// Every row-wise kernel runs one block per row; none uses atomics.

#include "common.cuh"

namespace velod {

constexpr int kOpsThreads = 256;  // threads per block of the row kernels
constexpr int kMaxTopK = 64;

// Sum over the block (every thread gets it); red holds kOpsThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32;
    __syncthreads();  // red may still be read by a previous call
    if (threadIdx.x % 32 == 0) red[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += red[w];
    return total;
}

// 1 / sqrt(mean(x²) + eps) of one row of n floats, for every thread of the block.
__device__ __forceinline__ float inverse_rms(const float* __restrict__ x, const int n,
                                             const float eps, float* red) {
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum = fmaf(x[i], x[i], sum);
    const float mean = block_sum(sum, red) / static_cast<float>(n);
    return 1.f / sqrtf(mean + eps);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ void embed(float* __restrict__ hidden, const T* __restrict__ table,
                                      const int* __restrict__ tokens, const int width,
                                      const int vocab, const float scale) {
    const int64_t r = blockIdx.x;
    const int token = tokens[r];
    const bool valid = token >= 0 && token < vocab;
    const T* const src = table + static_cast<int64_t>(valid ? token : 0) * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        hidden[r * width + i] = valid ? to_float<T>(src[i]) * scale : 0.f;
}

template <typename T>
__device__ __forceinline__ void rms_norm(T* __restrict__ out, const float* __restrict__ x,
                                         const float* __restrict__ weight,
                                         const int* __restrict__ index, const int n,
                                         const int64_t in_stride, const float eps) {
    __shared__ float red[kOpsThreads / 32];
    const int64_t r = blockIdx.x;
    const float* const row = x + (index != nullptr ? index[r] : r) * in_stride;
    const float inv = inverse_rms(row, n, eps, red);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[r * n + i] = from_float<T>(row[i] * inv * weight[i]);
}

// One warp per head of one token: q heads, then k heads, then v heads. The head's row goes
// through shared memory so that RoPE can pair any two elements.
template <typename T>
__device__ __forceinline__ void qkv(T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                                    const float* __restrict__ qkv_rows,
                                    const float* __restrict__ bias,
                                    const float* __restrict__ q_norm,
                                    const float* __restrict__ k_norm,
                                    const int* __restrict__ positions,
                                    const double* __restrict__ inv_freq, const int heads,
                                    const int kv_heads, const int head_dim, const int rope_dims,
                                    const int neox, const float eps) {
    __shared__ float rows[kOpsThreads / 32][256];
    const int64_t t = blockIdx.x;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int width = (heads + 2 * kv_heads) * head_dim;
    const double position = static_cast<double>(positions[t]);
    float* const buf = rows[warp];
    const int half = rope_dims / 2;
    for (int h = warp; h < heads + 2 * kv_heads; h += blockDim.x / 32) {
        const bool is_q = h < heads;
        const bool is_v = h >= heads + kv_heads;
        const float* const src = qkv_rows + t * width + static_cast<int64_t>(h) * head_dim;
        const float* const norm = is_q ? q_norm : (is_v ? nullptr : k_norm);
        float sum = 0.f;
        for (int i = lane; i < head_dim; i += 32) {
            const float x = src[i] + (bias != nullptr ? bias[h * head_dim + i] : 0.f);
            buf[i] = x;
            sum = fmaf(x, x, sum);
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        const float inv = 1.f / sqrtf(sum / static_cast<float>(head_dim) + eps);
        __syncwarp();
        if (norm != nullptr) {
            for (int i = lane; i < head_dim; i += 32) buf[i] = buf[i] * inv * norm[i];
            __syncwarp();
        }
        T* dst;
        if (is_q) dst = q + (t * heads + h) * head_dim;
        else if (!is_v) dst = k + (t * kv_heads + (h - heads)) * head_dim;
        else dst = v + (t * kv_heads + (h - heads - kv_heads)) * head_dim;
        for (int i = lane; i < head_dim; i += 32) {
            float y = buf[i];
            if (!is_v && inv_freq != nullptr && i < 2 * half) {
                // The element's pair and angle: NEOX pairs i with i ± half, NORM 2j with 2j+1.
                const int j = neox ? (i < half ? i : i - half) : i / 2;
                const bool first = neox ? i < half : (i % 2 == 0);
                const int partner = neox ? (first ? i + half : i - half) : (first ? i + 1 : i - 1);
                double sin_a, cos_a;
                sincos(position * inv_freq[j], &sin_a, &cos_a);
                const float c = static_cast<float>(cos_a);
                const float s = static_cast<float>(sin_a);
                y = first ? y * c - buf[partner] * s : y * c + buf[partner] * s;
            }
            dst[i] = from_float<T>(y);
        }
        __syncwarp();  // the next head reuses buf
    }
}

__device__ __forceinline__ void residual(float* __restrict__ hidden, const float* __restrict__ x,
                                         const float* __restrict__ weight, const int n,
                                         const float eps) {
    __shared__ float red[kOpsThreads / 32];
    const int64_t r = blockIdx.x;
    const float* const row = x + r * n;
    const float inv = weight != nullptr ? inverse_rms(row, n, eps, red) : 1.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        hidden[r * n + i] += weight != nullptr ? row[i] * inv * weight[i] : row[i];
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

__device__ __forceinline__ float gelu_tanh(float g) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

template <typename T, bool GELU>
__device__ __forceinline__ void gate(T* __restrict__ out, const float* __restrict__ gate_up,
                                     const int64_t rows, const int ffn) {
    const int64_t total = rows * ffn;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t r = i / ffn;
        const int64_t c = i - r * ffn;
        const float g = gate_up[r * 2 * ffn + c];
        const float u = gate_up[r * 2 * ffn + ffn + c];
        out[i] = from_float<T>((GELU ? gelu_tanh(g) : silu(g)) * u);
    }
}

// NumPy's argmax order: a NaN beats any number, then larger values, then lower indices.
__device__ __forceinline__ bool beats(const float a, const int ai, const float b, const int bi) {
    const bool a_nan = a != a, b_nan = b != b;
    if (a_nan != b_nan) return a_nan;
    if (!a_nan && a != b) return a > b;
    return ai < bi;
}

// The best (value, index) over the block, for every thread; red holds 2 * warps words.
__device__ __forceinline__ void block_best(float& value, int& index, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, value, off);
        const int i = __shfl_xor_sync(0xffffffffu, index, off);
        if (beats(v, i, value, index)) {
            value = v;
            index = i;
        }
    }
    const int warp = threadIdx.x / 32;
    const int warps = static_cast<int>(blockDim.x / 32);
    __syncthreads();  // red may still be read by a previous call
    if (threadIdx.x % 32 == 0) {
        red[warp] = value;
        reinterpret_cast<int*>(red)[warps + warp] = index;
    }
    __syncthreads();
    value = red[0];
    index = reinterpret_cast<int*>(red)[warps];
    for (int w = 1; w < warps; ++w) {
        const int i = reinterpret_cast<int*>(red)[warps + w];
        if (beats(red[w], i, value, index)) {
            value = red[w];
            index = i;
        }
    }
}

__device__ __forceinline__ void argmax(int* __restrict__ out, const float* __restrict__ logits,
                                       const int vocab) {
    __shared__ float red[2 * kOpsThreads / 32];
    const int64_t r = blockIdx.x;
    const float* const row = logits + r * vocab;
    float best = -INFINITY;
    int best_index = vocab;  // loses to any real element
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (beats(row[i], i, best, best_index)) {
            best = row[i];
            best_index = i;
        }
    }
    block_best(best, best_index, red);
    if (threadIdx.x == 0) out[r] = best_index < vocab ? best_index : 0;
}

// Each thread keeps its slice's k best in a sorted list; k rounds of a block-wide best over
// the lists' heads pick the row's k best in order.
__device__ __forceinline__ void topk(float* __restrict__ values, int* __restrict__ indices,
                                     const float* __restrict__ logits, const int vocab,
                                     const int k) {
    __shared__ float red[2 * kOpsThreads / 32];
    const int64_t r = blockIdx.x;
    const float* const row = logits + r * vocab;
    float list_v[kMaxTopK];
    int list_i[kMaxTopK];
    int count = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        if (count == k && !beats(x, i, list_v[k - 1], list_i[k - 1])) continue;
        int at = count < k ? count++ : k - 1;  // insertion sort from the back
        while (at > 0 && beats(x, i, list_v[at - 1], list_i[at - 1])) {
            list_v[at] = list_v[at - 1];
            list_i[at] = list_i[at - 1];
            --at;
        }
        list_v[at] = x;
        list_i[at] = i;
    }
    int head = 0;
    for (int j = 0; j < k; ++j) {
        float value = head < count ? list_v[head] : -INFINITY;
        int index = head < count ? list_i[head] : vocab + static_cast<int>(threadIdx.x);
        block_best(value, index, red);
        if (head < count && list_i[head] == index) ++head;  // the winner pops its head
        if (threadIdx.x == 0) {
            values[r * k + j] = index < vocab ? value : -INFINITY;
            indices[r * k + j] = index < vocab ? index : -1;
        }
    }
}

}  // namespace velod

// ---- extern "C" entry points, looked up by name from velod/kernels/model_ops.py ------------

#define VELOD_TYPED_OPS(TNAME, T)                                                             \
    extern "C" __global__ void __launch_bounds__(velod::kOpsThreads) velod_embed_##TNAME(     \
        float* hidden, const T* table, const int* tokens, int width, int vocab, float scale) { \
        velod::embed<T>(hidden, table, tokens, width, vocab, scale);                          \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(velod::kOpsThreads) velod_rms_norm_##TNAME(  \
        T* out, const float* x, const float* weight, const int* index, int n,                 \
        long long in_stride, float eps) {                                                     \
        velod::rms_norm<T>(out, x, weight, index, n, in_stride, eps);                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(velod::kOpsThreads) velod_qkv_##TNAME(       \
        T* q, T* k, T* v, const float* qkv_rows, const float* bias, const float* q_norm,      \
        const float* k_norm, const int* positions, const double* inv_freq, int heads,         \
        int kv_heads, int head_dim, int rope_dims, int neox, float eps) {                     \
        velod::qkv<T>(q, k, v, qkv_rows, bias, q_norm, k_norm, positions, inv_freq, heads,    \
                      kv_heads, head_dim, rope_dims, neox, eps);                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(velod::kOpsThreads) velod_silu_gate_##TNAME( \
        T* out, const float* gate_up, long long rows, int ffn) {                              \
        velod::gate<T, false>(out, gate_up, rows, ffn);                                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(velod::kOpsThreads) velod_gelu_gate_##TNAME( \
        T* out, const float* gate_up, long long rows, int ffn) {                              \
        velod::gate<T, true>(out, gate_up, rows, ffn);                                        \
    }

#if !defined(VELOD_ONLY_F16) && !defined(VELOD_ONLY_BF16)
VELOD_TYPED_OPS(f32, float)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_BF16)
VELOD_TYPED_OPS(f16, __half)
#endif
#if !defined(VELOD_ONLY_F32) && !defined(VELOD_ONLY_F16)
VELOD_TYPED_OPS(bf16, __nv_bfloat16)
#endif

extern "C" __global__ void __launch_bounds__(velod::kOpsThreads)
    velod_residual(float* hidden, const float* x, const float* weight, int n, float eps) {
    velod::residual(hidden, x, weight, n, eps);
}

extern "C" __global__ void __launch_bounds__(velod::kOpsThreads)
    velod_argmax(int* out, const float* logits, int vocab) {
    velod::argmax(out, logits, vocab);
}

extern "C" __global__ void __launch_bounds__(velod::kOpsThreads)
    velod_topk(float* values, int* indices, const float* logits, int vocab, int k) {
    velod::topk(values, indices, logits, vocab, k);
}
