// Runs velod/kernels/paged_attention.cu on the CPU, one OS thread per CUDA thread, so the CPU
// tests can check the kernels' indexing, barriers, shuffles and copy pipeline against NumPy.
//
// Built by tests/unit/test_kernel_emulation.py with g++ -std=c++20 -O0 (-fsanitize=address when
// available: buffers are exactly sized, so any out-of-bounds access aborts).
//   emulator attention KERNEL DIR   reads DIR/{params.txt,query,key_cache,value_cache,
//                                   block_tables,context_lens}.bin, writes DIR/out.bin
//   emulator prefill KERNEL DIR     the same plus query_start_loc.bin
//   emulator ops KERNEL DIR         a model_ops.cu kernel: every NAME.bin in DIR is an argument
//                                   (outputs come poisoned), outputs are written as NAME.out
//   emulator write_cache KERNEL DIR / emulator copy_blocks KERNEL DIR   (see main)
// Emulated: threadIdx/blockIdx, __syncthreads (block barrier), __shfl_xor_sync (barrier per
// lane group of the mask), __syncwarp, dynamic shared memory, cp.async groups (copies happen
// only at wait_group, zero-fill included), and the tensor-core path's ldmatrix (.trans) and
// mma.m16n8k16 (f16/bf16 in, f32 accumulators) with PTX's fragment layouts, through the warp's
// barrier. Blocks run one after another.

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

using std::max;
using std::min;

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __restrict__
#define __restrict__

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;
unsigned char* g_smem = nullptr;

namespace emu {
std::unique_ptr<std::barrier<>> block_barrier;
std::map<std::pair<int, int>, std::unique_ptr<std::barrier<>>> lane_barriers;  // (base, width)
std::vector<float> shuffle_slots;

struct PendingCopy {
    void* dst;
    const void* src;
    bool valid;
};
thread_local std::vector<PendingCopy> open_group;
thread_local std::vector<std::vector<PendingCopy>> committed;
}  // namespace emu

inline unsigned char* velod_emulated_smem() { return g_smem; }

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Static locals are shared by every OS thread, as a block's __shared__ arrays by its threads
// (blocks run one after another).
#undef __shared__
#define __shared__ static

inline float __shfl_xor_sync(unsigned mask, float value, int offset) {
    const int width = __builtin_popcount(mask);
    const int lane = threadIdx.x % 32;
    const int base = static_cast<int>(threadIdx.x) - lane + __builtin_ctz(mask);
    if (lane < __builtin_ctz(mask) || lane >= __builtin_ctz(mask) + width) std::abort();
    auto& barrier = *emu::lane_barriers.at({base, width});
    emu::shuffle_slots[threadIdx.x] = value;
    barrier.arrive_and_wait();
    const int partner = base + ((static_cast<int>(threadIdx.x) - base) ^ offset);
    const float result = emu::shuffle_slots[partner];
    barrier.arrive_and_wait();
    return result;
}

inline int __shfl_xor_sync(unsigned mask, int value, int offset) {
    float bits;
    std::memcpy(&bits, &value, 4);
    bits = __shfl_xor_sync(mask, bits, offset);
    std::memcpy(&value, &bits, 4);
    return value;
}

namespace emu {
std::vector<std::array<uint32_t, 6>> warp_words;  // per thread: mma a[4], b0, b1
std::vector<const void*> warp_rows;                // per thread: ldmatrix row address

inline std::barrier<>& warp_barrier() {
    return *lane_barriers.at({static_cast<int>(threadIdx.x) - static_cast<int>(threadIdx.x % 32),
                              32});
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
    if (bf16) {
        const uint32_t wide = static_cast<uint32_t>(bits) << 16;
        float f;
        std::memcpy(&f, &wide, 4);
        return f;
    }
    __half h;
    std::memcpy(&h, &bits, 2);
    return __half2float(h);
}
}  // namespace emu

inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(); }

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives row l % 8 of matrix l / 8.
inline void velod_emulated_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
    const int lane = threadIdx.x % 32;
    const int base = static_cast<int>(threadIdx.x) - lane;
    emu::warp_rows[threadIdx.x] = row;
    emu::warp_barrier().arrive_and_wait();
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {  // row lane / 4, columns 2 (lane % 4) and + 1
            const auto* p = static_cast<const uint16_t*>(emu::warp_rows[base + i * 8 + lane / 4]);
            lo = p[2 * (lane % 4)];
            hi = p[2 * (lane % 4) + 1];
        } else {  // rows 2 (lane % 4) and + 1, column lane / 4
            lo = static_cast<const uint16_t*>(
                emu::warp_rows[base + i * 8 + 2 * (lane % 4)])[lane / 4];
            hi = static_cast<const uint16_t*>(
                emu::warp_rows[base + i * 8 + 2 * (lane % 4) + 1])[lane / 4];
        }
        r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    emu::warp_barrier().arrive_and_wait();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A (16x16) * B (16x8), PTX's
// fragment layouts: A row r, column k in lane (r % 8) * 4 + (k % 8) / 2, register
// (r / 8) + 2 (k / 8), half k % 2; B row k, column n in lane n * 4 + (k % 8) / 2,
// register k / 8, half k % 2; D row g + 8 (c / 2), column 2 (lane % 4) + c % 2.
inline void velod_emulated_mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, bool bf16) {
    const int lane = threadIdx.x % 32;
    const int base = static_cast<int>(threadIdx.x) - lane;
    emu::warp_words[threadIdx.x] = {a[0], a[1], a[2], a[3], b0, b1};
    emu::warp_barrier().arrive_and_wait();
    auto element = [&](int owner, int reg, int half) {
        const uint32_t word = emu::warp_words[base + owner][reg];
        return emu::half_bits_to_float(static_cast<uint16_t>(half ? word >> 16 : word), bf16);
    };
    for (int c = 0; c < 4; ++c) {
        const int row = lane / 4 + 8 * (c / 2);
        const int col = 2 * (lane % 4) + c % 2;
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) {
            const float av = element((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8), k % 2);
            const float bv = element(col * 4 + (k % 8) / 2, 4 + k / 8, k % 2);
            sum += av * bv;
        }
        d[c] += sum;
    }
    emu::warp_barrier().arrive_and_wait();
}

inline void velod_emulated_copy16(void* dst, const void* src, bool valid) {
    emu::open_group.push_back({dst, src, valid});
}
inline void velod_emulated_commit() {
    emu::committed.push_back(std::move(emu::open_group));
    emu::open_group.clear();
}
inline void velod_emulated_wait(int keep) {
    while (static_cast<int>(emu::committed.size()) > keep) {
        for (const auto& c : emu::committed.front()) {
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        emu::committed.erase(emu::committed.begin());
    }
}

#define VELOD_HOST_EMULATION 1
#include "../../../velod/kernels/paged_attention.cu"
#include "../../../velod/kernels/prefill_attention.cu"
#include "../../../velod/kernels/model_ops.cu"

// Runs kernel(args...) over the grid with one persistent OS thread per CUDA thread.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, unsigned threads, size_t smem, Args... args) {
    blockDim = dim3(threads, 1, 1);
    gridDim = grid;
    std::vector<unsigned char> shared(smem > 0 ? smem : 1);
    g_smem = shared.data();
    emu::shuffle_slots.assign(threads, 0.f);
    emu::warp_words.assign(threads, {});
    emu::warp_rows.assign(threads, nullptr);
    emu::block_barrier = std::make_unique<std::barrier<>>(threads);
    emu::lane_barriers.clear();
    for (int width = 1; width <= 32; width *= 2)
        for (int base = 0; base < static_cast<int>(threads); base += width)
            emu::lane_barriers[{base, width}] = std::make_unique<std::barrier<>>(width);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        emu::block_barrier->arrive_and_wait();
                        if (t == 0) std::memset(shared.data(), 0xFF, shared.size());  // NaN
                        emu::block_barrier->arrive_and_wait();
                        blockIdx = dim3(x, y, z);
                        kernel(static_cast<Params>(args)...);
                        if (!emu::committed.empty() || !emu::open_group.empty()) {
                            // The kernel must wait for every copy it issued before exiting.
                            std::fprintf(stderr, "thread %u exits with pending copies\n", t);
                            std::abort();
                        }
                    }
        });
    }
    for (auto& th : pool) th.join();
    g_smem = nullptr;
}

static std::vector<unsigned char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(2); }
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), {});
}

static void write_file(const std::string& path, const std::vector<unsigned char>& data) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(data.data()),
                                                 static_cast<std::streamsize>(data.size()));
}

static std::map<std::string, double> read_params(const std::string& path) {
    std::map<std::string, double> params;
    std::ifstream in(path);
    std::string key;
    double value;
    while (in >> key >> value) params[key] = value;
    return params;
}

using AttentionFn = void (*)(void*, float*, float*, float*, const void*, const void*,
                             const void*, const int*, const int*, float, int, int, int, int, int,
                             int, int);
using MergeFn = void (*)(void*, const float*, const float*, const float*, const int*, int, int,
                         int, int, int);
using PrefillFn = void (*)(void*, const void*, const void*, const void*, const int*, const int*,
                           const int*, float, int, int, int, int, int);

template <typename F>
static F cast_fn(auto* f) { return reinterpret_cast<F>(reinterpret_cast<void*>(f)); }

#define EMU_ATT(TNAME, D, BS) \
    {"velod_paged_attention_" #TNAME "_d" #D "_b" #BS, \
     cast_fn<AttentionFn>(&velod_paged_attention_##TNAME##_d##D##_b##BS)},
#define EMU_ATT_D(TNAME, D) EMU_ATT(TNAME, D, 8) EMU_ATT(TNAME, D, 16) EMU_ATT(TNAME, D, 32)
#define EMU_ATT_ALL(TNAME) EMU_ATT_D(TNAME, 64) EMU_ATT_D(TNAME, 80) EMU_ATT_D(TNAME, 96) \
    EMU_ATT_D(TNAME, 112) EMU_ATT_D(TNAME, 128) EMU_ATT_D(TNAME, 256)

static const std::map<std::string, AttentionFn> kAttention = {
#if defined(VELOD_ONLY_F32)
    EMU_ATT_ALL(f32)
#elif defined(VELOD_ONLY_F16)
    EMU_ATT_ALL(f16)
#elif defined(VELOD_ONLY_BF16)
    EMU_ATT_ALL(bf16)
#endif
};

#define EMU_PRE(TNAME, D) \
    {"velod_prefill_attention_" #TNAME "_d" #D, \
     cast_fn<PrefillFn>(&velod_prefill_attention_##TNAME##_d##D)},
#define EMU_PRE_ALL(TNAME) EMU_PRE(TNAME, 64) EMU_PRE(TNAME, 80) EMU_PRE(TNAME, 96) \
    EMU_PRE(TNAME, 112) EMU_PRE(TNAME, 128) EMU_PRE(TNAME, 256)

static const std::map<std::string, PrefillFn> kPrefill = {
#if defined(VELOD_ONLY_F32)
    EMU_PRE_ALL(f32)
#elif defined(VELOD_ONLY_F16)
    EMU_PRE_ALL(f16)
#elif defined(VELOD_ONLY_BF16)
    EMU_PRE_ALL(bf16)
#endif
};

static const std::map<std::string, MergeFn> kMerge = {
#if defined(VELOD_ONLY_F32)
    {"f32", cast_fn<MergeFn>(&velod_merge_partitions_f32)},
#elif defined(VELOD_ONLY_F16)
    {"f16", cast_fn<MergeFn>(&velod_merge_partitions_f16)},
#elif defined(VELOD_ONLY_BF16)
    {"bf16", cast_fn<MergeFn>(&velod_merge_partitions_bf16)},
#endif
};

// ---- model_ops.cu --------------------------------------------------------------------------

#if defined(VELOD_ONLY_F32)
using OpT = float;
#define OPS(name) velod_##name##_f32
#elif defined(VELOD_ONLY_F16)
using OpT = __half;
#define OPS(name) velod_##name##_f16
#else
using OpT = __nv_bfloat16;
#define OPS(name) velod_##name##_bf16
#endif

// The DIR/NAME.bin arrays of one call; a missing file is a null pointer argument.
struct Arrays {
    std::string dir;
    std::map<std::string, std::vector<unsigned char>> data;
    template <typename P>
    P* get(const std::string& name) {
        auto found = data.find(name);
        if (found == data.end()) {
            std::ifstream probe(dir + name + ".bin", std::ios::binary);
            if (!probe) return nullptr;
            found = data.emplace(name, read_file(dir + name + ".bin")).first;
        }
        return reinterpret_cast<P*>(found->second.data());
    }
    void put(const std::string& name) { write_file(dir + name + ".out", data.at(name)); }
};

static void run_op(const std::string& kernel, Arrays& a, std::map<std::string, double>& p) {
    auto i = [&](const char* k) { return static_cast<int>(p.at(k)); };
    const dim3 rows(static_cast<unsigned>(i("rows")), 1, 1);
    const unsigned threads = velod::kOpsThreads;
    if (kernel == "embed") {
        launch(&OPS(embed), rows, threads, 0, a.get<float>("hidden"), a.get<const OpT>("table"),
               a.get<const int>("tokens"), i("width"), i("vocab"),
               static_cast<float>(p.at("scale")));
        a.put("hidden");
    } else if (kernel == "rms_norm") {
        launch(&OPS(rms_norm), rows, threads, 0, a.get<OpT>("out"), a.get<const float>("x"),
               a.get<const float>("weight"), a.get<const int>("index"), i("n"),
               static_cast<long long>(p.at("in_stride")), static_cast<float>(p.at("eps")));
        a.put("out");
    } else if (kernel == "qkv") {
        launch(&OPS(qkv), rows, threads, 0, a.get<OpT>("q"), a.get<OpT>("k"), a.get<OpT>("v"),
               a.get<const float>("qkv"), a.get<const float>("bias"),
               a.get<const float>("q_norm"), a.get<const float>("k_norm"),
               a.get<const int>("positions"), a.get<const double>("inv_freq"), i("heads"),
               i("kv_heads"), i("head_dim"), i("rope_dims"), i("neox"),
               static_cast<float>(p.at("eps")));
        a.put("q");
        a.put("k");
        a.put("v");
    } else if (kernel == "residual") {
        launch(&velod_residual, rows, threads, 0, a.get<float>("hidden"),
               a.get<const float>("x"), a.get<const float>("weight"), i("n"),
               static_cast<float>(p.at("eps")));
        a.put("hidden");
    } else if (kernel == "silu_gate" || kernel == "gelu_gate") {
        launch(kernel == "silu_gate" ? &OPS(silu_gate) : &OPS(gelu_gate),
               dim3(static_cast<unsigned>(i("blocks")), 1, 1), threads, 0, a.get<OpT>("out"),
               a.get<const float>("gate_up"), static_cast<long long>(i("rows")), i("ffn"));
        a.put("out");
    } else if (kernel == "argmax") {
        launch(&velod_argmax, rows, threads, 0, a.get<int>("out"), a.get<const float>("logits"),
               i("vocab"));
        a.put("out");
    } else if (kernel == "topk") {
        launch(&velod_topk, rows, threads, 0, a.get<float>("values"), a.get<int>("indices"),
               a.get<const float>("logits"), i("vocab"), i("k"));
        a.put("values");
        a.put("indices");
    } else {
        std::fprintf(stderr, "unknown op %s\n", kernel.c_str());
        std::exit(2);
    }
}

int main(int argc, char** argv) {
    if (argc != 4) { std::fprintf(stderr, "usage: emulator OP KERNEL DIR\n"); return 2; }
    const std::string op = argv[1], kernel = argv[2], dir = std::string(argv[3]) + "/";
    auto p = read_params(dir + "params.txt");
    auto i = [&](const char* k) { return static_cast<int>(p.at(k)); };
    if (op == "attention") {
        auto query = read_file(dir + "query.bin");
        auto key_cache = read_file(dir + "key_cache.bin");
        auto value_cache = read_file(dir + "value_cache.bin");
        auto tables = read_file(dir + "block_tables.bin");
        auto lens = read_file(dir + "context_lens.bin");
        std::vector<unsigned char> out(query.size(), 0xFF);  // NaN until written
        const size_t rows = static_cast<size_t>(i("num_seqs")) * i("num_heads") * i("max_parts");
        const bool split = i("max_parts") > 1;
        std::vector<float> part_out(split ? rows * i("head_dim") : 0, NAN);
        std::vector<float> part_max(split ? rows : 0, NAN), part_sum(split ? rows : 0, NAN);
        launch(kAttention.at(kernel), dim3(i("max_parts"), i("grid_y"), i("num_seqs")),
               static_cast<unsigned>(i("threads")), static_cast<size_t>(i("smem_bytes")),
               static_cast<void*>(out.data()), split ? part_out.data() : nullptr,
               split ? part_max.data() : nullptr, split ? part_sum.data() : nullptr,
               static_cast<const void*>(query.data()),
               static_cast<const void*>(key_cache.data()),
               static_cast<const void*>(value_cache.data()),
               reinterpret_cast<const int*>(tables.data()),
               reinterpret_cast<const int*>(lens.data()), static_cast<float>(p.at("scale_log2")),
               i("num_heads"), i("num_kv_heads"), i("heads_per_block"), i("max_blocks_per_seq"),
               i("partition_size"), i("max_parts"), i("window"));
        if (split) {
            launch(kMerge.at(kernel.substr(22, kernel.find("_d") - 22)),
                   dim3(i("num_heads"), i("num_seqs"), 1), velod::kThreads, 0,
                   static_cast<void*>(out.data()), static_cast<const float*>(part_out.data()),
                   static_cast<const float*>(part_max.data()),
                   static_cast<const float*>(part_sum.data()),
                   reinterpret_cast<const int*>(lens.data()), i("num_heads"), i("head_dim"),
                   i("partition_size"), i("max_parts"), i("window"));
        }
        write_file(dir + "out.bin", out);
        return 0;
    }
    if (op == "ops") {
        Arrays arrays{dir, {}};
        run_op(kernel, arrays, p);
        return 0;
    }
    if (op == "prefill") {
        auto query = read_file(dir + "query.bin");
        auto key_cache = read_file(dir + "key_cache.bin");
        auto value_cache = read_file(dir + "value_cache.bin");
        auto tables = read_file(dir + "block_tables.bin");
        auto starts = read_file(dir + "query_start_loc.bin");
        auto lens = read_file(dir + "context_lens.bin");
        std::vector<unsigned char> out(query.size(), 0xFF);  // NaN until written
        launch(kPrefill.at(kernel), dim3(i("grid_x"), i("num_kv_heads"), i("num_seqs")),
               static_cast<unsigned>(i("threads")), static_cast<size_t>(i("smem_bytes")),
               static_cast<void*>(out.data()), static_cast<const void*>(query.data()),
               static_cast<const void*>(key_cache.data()),
               static_cast<const void*>(value_cache.data()),
               reinterpret_cast<const int*>(tables.data()),
               reinterpret_cast<const int*>(starts.data()),
               reinterpret_cast<const int*>(lens.data()), static_cast<float>(p.at("scale_log2")),
               i("num_heads"), i("num_kv_heads"), i("max_blocks_per_seq"), i("block_size"),
               i("window"));
        write_file(dir + "out.bin", out);
        return 0;
    }
    auto key_cache = read_file(dir + "key_cache.bin");
    auto value_cache = read_file(dir + "value_cache.bin");
    auto index = read_file(dir + "index.bin");
    const bool wide = kernel.ends_with("i64");
    if (op == "write_cache") {
        auto key = read_file(dir + "key.bin");
        auto value = read_file(dir + "value.bin");
        const long long row = static_cast<long long>(p.at("row_bytes"));
        const unsigned tokens = static_cast<unsigned>(i("num_tokens"));
        if (wide) {
            launch(&velod_write_cache_i64, dim3(tokens, 2, 1), velod::kThreads, 0,
                   key_cache.data(), value_cache.data(),
                   static_cast<const unsigned char*>(key.data()),
                   static_cast<const unsigned char*>(value.data()),
                   reinterpret_cast<const long long*>(index.data()), row, row, row,
                   static_cast<long long>(i("num_slots")));
        } else {
            launch(&velod_write_cache_i32, dim3(tokens, 2, 1), velod::kThreads, 0,
                   key_cache.data(), value_cache.data(),
                   static_cast<const unsigned char*>(key.data()),
                   static_cast<const unsigned char*>(value.data()),
                   reinterpret_cast<const int*>(index.data()), row, row, row,
                   static_cast<long long>(i("num_slots")));
        }
    } else {
        const long long block = static_cast<long long>(p.at("block_bytes"));
        const unsigned pairs = static_cast<unsigned>(i("num_pairs"));
        if (wide) {
            launch(&velod_copy_blocks_i64, dim3(pairs, 2, 1), velod::kThreads, 0,
                   key_cache.data(), value_cache.data(),
                   reinterpret_cast<const long long*>(index.data()), block);
        } else {
            launch(&velod_copy_blocks_i32, dim3(pairs, 2, 1), velod::kThreads, 0,
                   key_cache.data(), value_cache.data(),
                   reinterpret_cast<const int*>(index.data()), block);
        }
    }
    write_file(dir + "key_cache.out", key_cache);
    write_file(dir + "value_cache.out", value_cache);
    return 0;
}
