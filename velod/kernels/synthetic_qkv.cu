// velod's synthetic model on the GPU: q, k and v for a step's tokens, one layer per launch.
// Compiled and cached like paged_attention.cu (velod.kernels.cuda.compile_cubin); the host
// twin is velod.engine.synthetic.synthetic_vectors, and the two agree bit for bit.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ unsigned int fmix32(unsigned int x) {
    x ^= x >> 16; x *= 0x85ebca6bu; x ^= x >> 13; x *= 0xc2b2ae35u; x ^= x >> 16;
    return x;
}

// The same numbers as velod.engine.synthetic.synthetic_vectors, for q, k and v at once.
// dtype: 0 = float32, 1 = float16, 2 = bfloat16 (16-bit outputs are stored as bit patterns).
extern "C" __global__ void velod_synthetic_qkv(
        void* q, void* k, void* v, const int* tokens, const int* positions, int num_tokens,
        int q_width, int kv_width, unsigned int q_salt, unsigned int k_salt, unsigned int v_salt,
        float q_gain, int dtype) {
    const long long row_width = (long long)q_width + 2LL * kv_width;
    const long long total = (long long)num_tokens * row_width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / row_width);
        int e = (int)(i - (long long)t * row_width);
        void* base; unsigned int salt; float gain; int width;
        if (e < q_width) { base = q; salt = q_salt; gain = q_gain; width = q_width; }
        else if (e < q_width + kv_width) {
            e -= q_width; base = k; salt = k_salt; gain = 1.0f; width = kv_width;
        } else {
            e -= q_width + kv_width; base = v; salt = v_salt; gain = 1.0f; width = kv_width;
        }
        const unsigned int seed = fmix32((unsigned int)tokens[t] * 0x9E3779B1u
                                         ^ fmix32((unsigned int)positions[t] * 0x85EBCA77u + salt));
        const unsigned int bits = fmix32(seed ^ ((unsigned int)e * 0x27D4EB2Fu));
        const float unit = __fmul_rn((float)(bits >> 8), 1.1920928955078125e-07f);  // 2^-23
        const float value = __fmul_rn(__fsub_rn(unit, 1.0f), gain);
        const long long at = (long long)t * width + e;
        if (dtype == 0) {
            ((float*)base)[at] = value;
        } else if (dtype == 1) {
            ((unsigned short*)base)[at] = __half_as_ushort(__float2half_rn(value));
        } else {
            ((unsigned short*)base)[at] = __bfloat16_as_ushort(__float2bfloat16_rn(value));
        }
    }
}
