// Device helpers shared by velod's CUDA kernels (paged_attention.cu, prefill_attention.cu,
// model_ops.cu): vector loads and conversions, cp.async copies, and the tensor-core
// primitives (ldmatrix, mma.m16n8k16) with their quad reductions.
//
// Under VELOD_HOST_EMULATION (tests/unit/kernels/kernel_emulator.cpp) the asynchronous copies,
// ldmatrix and mma call the emulator's functions, which follow PTX's semantics on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

// sm_80 and newer run mma.sync and cp.async; the emulator emulates both.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(VELOD_HOST_EMULATION)
#define VELOD_TENSOR_CORES 1
#endif

namespace velod {

__host__ __device__ constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }
__host__ __device__ constexpr int pow2_floor(int x) { return x < 2 ? 1 : 2 * pow2_floor(x / 2); }
__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

constexpr int kThreads = 128;        // threads per attention block
constexpr int kStageBytes = 16384;   // K + V bytes per pipeline stage

// The CUDA-core kernels' geometry for (T, HEAD_DIM): a group of kLanes lanes holds one
// head_dim row as 16-byte vectors; K/V tiles of kTileTokens tokens are staged in shared
// memory. velod/kernels/layout.py mirrors it (kernel_geometry).
template <typename T, int HEAD_DIM>
struct Geometry {
    static constexpr int kVec = 16 / static_cast<int>(sizeof(T));      // elements / 16 bytes
    static constexpr int kRowVecs = HEAD_DIM / kVec;                    // vectors per row
    static constexpr int kLanes = cmin(32, pow2_ceil(kRowVecs));        // lanes per row
    static constexpr int kVecsPerLane = (kRowVecs + kLanes - 1) / kLanes;
    static constexpr int kGroups = kThreads / kLanes;                   // max heads per block
    static constexpr int kRowBytes = HEAD_DIM * static_cast<int>(sizeof(T));
    static constexpr int kTileTokens = cmin(64, pow2_floor(kStageBytes / (2 * kRowBytes)));
    static constexpr int kSmemBytes = 2 * 2 * kTileTokens * kRowBytes;  // 2 stages of K + V
    static_assert(HEAD_DIM % kVec == 0, "head_dim must be a multiple of 16 bytes");
    static_assert(kGroups * (HEAD_DIM + 2) * 4 <= kSmemBytes, "merge buffer must fit");
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[16 / sizeof(T)]);

template <>
__device__ __forceinline__ void load_vec<float>(const float* p, float (&f)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}

template <>
__device__ __forceinline__ void load_vec<__half>(const __half* p, float (&f)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __half22float2(h[i]);
        f[2 * i] = t.x; f[2 * i + 1] = t.y;
    }
}

template <>
__device__ __forceinline__ void load_vec<__nv_bfloat16>(const __nv_bfloat16* p, float (&f)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x; f[2 * i + 1] = t.y;
    }
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// 16-byte global -> shared copy; valid == false writes zeros and reads nothing.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
#elif defined(VELOD_HOST_EMULATION)  // tests: deferred copies, as cp.async behaves
    velod_emulated_copy16(smem, gmem, valid);
#else
    *reinterpret_cast<uint4*>(smem) =
        valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(VELOD_HOST_EMULATION)
    velod_emulated_commit();
#endif
}

template <int N>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#elif defined(VELOD_HOST_EMULATION)
    velod_emulated_wait(N);
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Four 8x8 b16 matrices from shared memory; lane l gives the row address l % 8 of matrix l / 8.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(VELOD_HOST_EMULATION)
    velod_emulated_ldmatrix_x4(r, row, TRANS);
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    }
#endif
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(VELOD_HOST_EMULATION)
    velod_emulated_mma16816(d, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
#else
    if constexpr (std::is_same_v<T, __half>) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

}  // namespace velod
