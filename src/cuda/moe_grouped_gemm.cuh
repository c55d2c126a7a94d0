// Grouped GEMM for the mixture-of-experts experts (moe_experts.cu, moe_experts_backward.cu).
//
// What it computes:  C[m, n] = sum_k A(m, k) B(n, k)  for every expert e, in one launch, with
// fp32 accumulation on tensor cores (mma.sync m16n8k16, bf16 or fp16 operands). Two groupings:
//   kRows:       the rows m are grouped: rows [offsets[e], offsets[e+1]) use expert e's B
//                (forward GEMMs, input-gradient GEMMs). A is K-contiguous (a[m * lda + k]); B is
//                K-contiguous (b[e * bs + n * ldb + k], a weight used as W^T) or N-contiguous
//                (b[e * bs + k * ldb + n], a weight used as is).
//   kReduction:  the reduction k is grouped: C_e = sum over expert e's rows k of A(m, k) B(n, k)
//                (weight gradients). A and B are row matrices read along m / n:
//                a[k * lda + m], b[k * ldb + n]; C_e = c[e * cs + m * ldc + n].
// Epilogues: plain store; SwiGLU (the first forward GEMM: the block's 128 columns are 64 gate and
// the matching 64 up columns of gate_up_proj, interleaved so that every thread holds both halves
// of its outputs: no shared-memory exchange); SwiGLU backward (the d_act GEMM: reads gate_up,
// writes d_gate_up and optionally act).
//
// Tiling: 128 x 128 x 32 block tile, 8 warps as 2 (m) x 4 (n), 64 x 32 per warp (4 x 4 mma
// tiles, 64 fp32 accumulators per thread), 4-stage cp.async pipeline. Shared tiles keep the
// global layout's contiguous dimension contiguous (+8 elements of padding: conflict-free
// ldmatrix); K-contiguous tiles feed mma through ldmatrix, M/N-contiguous ones through
// ldmatrix.trans. Loads are 16-byte cp.async where the problem is aligned (vector_ok), else
// element-wise (any H, I); out-of-range rows/columns are zero-filled and never stored.
//
// Scheduling without host synchronisation: kRows launches ceil(N / 128) + E row tiles (an upper
// bound of sum_e ceil(rows_e / 128)) along y and the column tiles along x (fastest: L2 reuse of
// A and of each expert's weights); each block finds its (expert, tile) by a block scan
// over the offsets read on the device (all experts' offsets loaded at once: one memory round
// trip for E <= 256; the first version walked them a warp at a time, ~8 dependent L2 round trips
// at E = 256 before any tile load), and surplus blocks exit. kReduction launches one z-slice per
// expert (an expert without rows writes zeros). Every output element is computed by exactly one
// block in a fixed order: deterministic. Offsets are clamped to [0, N], so malformed offsets can
// never make a block read or write out of bounds.
//
// Assumes: sm_80+; bf16 or fp16; N < 2^31; 64-bit index arithmetic for every address.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/cuda_check.cuh"
#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda::moe {

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kThreads = 256;
// Three k-tiles in flight while one is consumed. With 3 stages a tile had two k-steps (~0.25 us
// each at the mma.sync rate) to arrive, less than a loaded L2 / DRAM round trip. 4 x 20 KiB:
// two blocks per SM on sm_90 (and on sm_80's 164 KiB), and under sm_86/89's 99 KiB per block.
constexpr int kStages = 4;
constexpr int kPad = 8;  // elements of padding per shared row: 16 bytes
// Elements of one operand's tile in one stage: K-contiguous [128][32 + 8] or [32][128 + 8].
constexpr int kTileElems = (kBM * (kBK + kPad) > kBK * (kBM + kPad)) ? kBM * (kBK + kPad)
                                                                     : kBK * (kBM + kPad);
constexpr int kSmemBytes = kStages * 2 * kTileElems * 2;
constexpr int kMaxDevices = 64;

enum class Grouping { kRows, kReduction };
enum class Epilogue { kStore, kSwiGLU, kSwiGLUBackward };

template <typename T>
struct GroupedGemmParams {
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  int64_t b_expert_stride = 0;  // kRows only
  T* c = nullptr;
  int64_t ldc = 0;
  int64_t c_expert_stride = 0;  // kReduction only
  const int32_t* offsets = nullptr;  // [E + 1]
  int num_experts = 0;
  int64_t num_rows = 0;  // N: rows of the grouped operand (offsets are clamped to it)
  int64_t m_size = 0;    // kReduction: extent of m
  int64_t n_size = 0;    // extent of n (kSwiGLU: I, the act columns)
  int64_t k_size = 0;    // kRows: extent of k
  // Epilogue operands (ld_gate_up also serves d_gate_up).
  T* gate_up = nullptr;
  int64_t ld_gate_up = 0;
  T* d_gate_up = nullptr;
  T* act = nullptr;  // kSwiGLUBackward: may be null (no weight gradients)
  int64_t ld_act = 0;
  int64_t intermediate = 0;  // I
  bool vector_ok = false;    // 16-byte aligned bases, expert strides and leading dimensions
  bool pair_store_ok = false;  // kStore: c 4-byte aligned, ldc and c_expert_stride even
  // sm90 kStore: c 16-byte aligned, ldc and c_expert_stride % 8 == 0; sm90 kSwiGLU (the wide
  // kernel) and kSwiGLUBackward: the same for gate_up, act and d_gate_up (ld_gate_up, ld_act,
  // I % 8 == 0).
  bool vector_store_ok = false;
  // sm90 wide kernel, kStore and kSwiGLU: the host encoded the output tensor maps, so whole
  // staged blocks may leave by TMA stores.
  bool tma_store_ok = false;
};

// Two adjacent outputs written as one 4-byte store.
template <typename T>
struct alignas(2 * sizeof(T)) StorePair {
  T x, y;
};

// v clamped to [lo, hi] (offsets read on the device are never trusted as addresses).
__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__device__ __forceinline__ float round_f32(float x) { return to_f32<T>(from_f32<T>(x)); }

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  }
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
  if constexpr (sizeof(T) == 2 && std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// One operand tile of one stage: `outer` rows of `inner` contiguous elements in global memory,
// copied to shared rows of inner + kPad. row_ptr(o) is the global row o (nullptr: zero row);
// elements at inner index >= inner_limit are zero.
template <int kOuter, int kInner, typename RowPtr>
__device__ __forceinline__ void load_tile(uint16_t* smem, RowPtr row_ptr, int64_t inner_start,
                                          int64_t inner_limit, bool vector_ok) {
  constexpr int kChunksPerRow = kInner / 8;
  constexpr int kChunks = kOuter * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int chunk = it * kThreads + static_cast<int>(threadIdx.x);
    const int o = chunk / kChunksPerRow;
    const int i = (chunk % kChunksPerRow) * 8;
    uint16_t* dst = smem + o * (kInner + kPad) + i;
    const uint16_t* row = row_ptr(o);
    const int64_t gi = inner_start + i;
    if (row != nullptr && vector_ok && gi + 8 <= inner_limit) {
      cp_async_16(dst, row + gi);
    } else {
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        dst[v] = (row != nullptr && gi + v < inner_limit) ? row[gi + v] : uint16_t{0};
      }
    }
  }
}

// Row tile `tile_id` of the concatenation of every expert's ceil(rows_e / kTileRows) tiles, as
// (expert, tile within the expert); expert -1 for a surplus block. All threads take one expert
// each (kBlockThreads experts a round, one round for E <= 256): their offsets are read in
// parallel, so finding the tile costs one memory round trip, not one per warp of experts, and a
// block scan (warp scans + warp totals in shared memory) places them. Every thread of the block
// must call it (it synchronises the block); the result is uniform across the block.
template <int kBlockThreads, int kTileRows>
__device__ __forceinline__ int2 find_row_tile(const int32_t* offsets, int num_experts,
                                              int64_t num_rows, int tile_id) {
  static_assert(kBlockThreads % 32 == 0, "whole warps");
  __shared__ int s_warp_tiles[kBlockThreads / 32];  // tile counts fit in int: N < 2^31
  __shared__ int s_expert;
  __shared__ int s_tile;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (threadIdx.x == 0) s_expert = -1;
  __syncthreads();
  int carry = 0;  // tiles of the experts of earlier rounds (uniform across the block)
  for (int base = 0; base < num_experts; base += kBlockThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    int tiles = 0;
    if (e < num_experts) {
      const int64_t begin = clamp_index(offsets[e], 0, num_rows);
      const int64_t end = clamp_index(offsets[e + 1], begin, num_rows);
      tiles = static_cast<int>((end - begin + kTileRows - 1) / kTileRows);
    }
    int inclusive = tiles;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    if (lane == 31) s_warp_tiles[warp] = inclusive;
    __syncthreads();
    int before_warp = 0, round_total = 0;
#pragma unroll
    for (int w = 0; w < kBlockThreads / 32; ++w) {
      const int t = s_warp_tiles[w];
      before_warp += w < warp ? t : 0;
      round_total += t;
    }
    const int start = carry + before_warp + inclusive - tiles;
    if (tiles > 0 && tile_id >= start && tile_id < start + tiles) {  // exactly one thread
      s_expert = e;
      s_tile = tile_id - start;
    }
    carry += round_total;
    __syncthreads();  // s_expert / s_tile visible; s_warp_tiles free for the next round
    if (s_expert >= 0 || carry > tile_id) break;  // uniform: shared and uniform values
  }
  return make_int2(s_expert, s_expert >= 0 ? s_tile : 0);
}

// The SwiGLU forward epilogue for one output (m, j): stores gate_up[m, j], gate_up[m, I + j]
// (the GEMM results rounded to the storage dtype) and act[m, j] = silu(g) * u computed from the
// rounded values, as the unfused reference would.
template <typename T>
__device__ __forceinline__ void store_swiglu(const GroupedGemmParams<T>& p, int64_t m, int64_t j,
                                             float gate, float up) {
  const float g = round_f32<T>(gate);
  const float u = round_f32<T>(up);
  p.gate_up[m * p.ld_gate_up + j] = from_f32<T>(g);
  p.gate_up[m * p.ld_gate_up + p.intermediate + j] = from_f32<T>(u);
  p.act[m * p.ld_act + j] = from_f32<T>(g / (1.0f + __expf(-g)) * u);
}

// The SwiGLU backward epilogue for one d_act[m, n] = v: reads gate_up, writes d_gate_up and
// (when weight gradients are wanted) act = silu(g) * u, recomputed rather than stored forward.
template <typename T>
__device__ __forceinline__ void store_swiglu_backward(const GroupedGemmParams<T>& p, int64_t m,
                                                      int64_t n, float v) {
  const float g = to_f32<T>(p.gate_up[m * p.ld_gate_up + n]);
  const float u = to_f32<T>(p.gate_up[m * p.ld_gate_up + p.intermediate + n]);
  const float sig = 1.0f / (1.0f + __expf(-g));
  const float silu = g * sig;
  p.d_gate_up[m * p.ld_gate_up + n] = from_f32<T>(v * u * sig * (1.0f + g * (1.0f - sig)));
  p.d_gate_up[m * p.ld_gate_up + p.intermediate + n] = from_f32<T>(v * silu);
  if (p.act != nullptr) p.act[m * p.ld_act + n] = from_f32<T>(silu * u);
}

// store_swiglu for the columns j and j + 1 at once (4-byte accesses: the caller has checked
// that gate_up, act, their leading dimensions and I keep column pairs 4-byte aligned).
template <typename T>
__device__ __forceinline__ void store_swiglu_pair(const GroupedGemmParams<T>& p, int64_t m,
                                                  int64_t j, float gate0, float up0, float gate1,
                                                  float up1) {
  const float g0 = round_f32<T>(gate0), g1 = round_f32<T>(gate1);
  const float u0 = round_f32<T>(up0), u1 = round_f32<T>(up1);
  T* row = p.gate_up + m * p.ld_gate_up;
  *reinterpret_cast<StorePair<T>*>(row + j) = StorePair<T>{from_f32<T>(g0), from_f32<T>(g1)};
  *reinterpret_cast<StorePair<T>*>(row + p.intermediate + j) =
      StorePair<T>{from_f32<T>(u0), from_f32<T>(u1)};
  *reinterpret_cast<StorePair<T>*>(p.act + m * p.ld_act + j) =
      StorePair<T>{from_f32<T>(g0 / (1.0f + __expf(-g0)) * u0),
                   from_f32<T>(g1 / (1.0f + __expf(-g1)) * u1)};
}

// The SwiGLU backward of one element (the arithmetic of store_swiglu_backward) for the sm90
// epilogue: from v = d_act[m, n] and the stored g = gate_up[m, n], u = gate_up[m, I + n].
template <typename T>
__device__ __forceinline__ void swiglu_backward_values(float v, T g_stored, T u_stored, T& d_g,
                                                       T& d_u, T& act) {
  const float g = to_f32<T>(g_stored), u = to_f32<T>(u_stored);
  const float sig = 1.0f / (1.0f + __expf(-g));
  const float silu = g * sig;
  d_g = from_f32<T>(v * u * sig * (1.0f + g * (1.0f - sig)));
  d_u = from_f32<T>(v * silu);
  act = from_f32<T>(silu * u);
}

// ptxas fits every instantiation in <= 128 registers without spills (two blocks per SM), as
// long as no minimum block count is forced: __launch_bounds__(kThreads, 2) makes the SwiGLU
// instantiation spill.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads)
grouped_gemm_kernel(const GroupedGemmParams<T> p) {
  extern __shared__ __align__(16) uint16_t smem[];
  constexpr bool kAKContig = kGrouping == Grouping::kRows;
  static_assert(kGrouping == Grouping::kRows || !kBKContig,
                "weight-gradient GEMMs read both operands along m / n");

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_m = warp / 4;  // 0..1: 64 rows each
  const int warp_n = warp % 4;  // 0..3: 32 columns each

  // ---- which expert and which tile this block computes
  int expert = 0;
  int64_t m_tile_start = 0;  // kRows: first row of the tile; kReduction: first m
  int64_t row_begin = 0, row_end = 0;
  // kRows: x = column tile (fastest: see the launch), y = row tile; kReduction: x = m, y = n.
  const int64_t n_tile = kGrouping == Grouping::kRows ? blockIdx.x : blockIdx.y;
  if constexpr (kGrouping == Grouping::kRows) {
    const int2 found = find_row_tile<kThreads, kBM>(p.offsets, p.num_experts, p.num_rows,
                                                    static_cast<int>(blockIdx.y));
    if (found.x < 0) return;  // a surplus block: uniform across the block
    expert = found.x;
    row_begin = clamp_index(p.offsets[expert], 0, p.num_rows);
    row_end = clamp_index(p.offsets[expert + 1], row_begin, p.num_rows);
    m_tile_start = row_begin + static_cast<int64_t>(found.y) * kBM;
  } else {
    expert = blockIdx.z;
    row_begin = clamp_index(p.offsets[expert], 0, p.num_rows);
    row_end = clamp_index(p.offsets[expert + 1], row_begin, p.num_rows);
    m_tile_start = static_cast<int64_t>(blockIdx.x) * kBM;
  }

  const int64_t k_extent = kGrouping == Grouping::kRows ? p.k_size : row_end - row_begin;
  const int num_k_tiles = static_cast<int>((k_extent + kBK - 1) / kBK);
  const uint16_t* a_base = reinterpret_cast<const uint16_t*>(p.a);
  const uint16_t* b_base = reinterpret_cast<const uint16_t*>(p.b);
  if constexpr (kGrouping == Grouping::kRows) b_base += static_cast<int64_t>(expert) * p.b_expert_stride;
  const int64_t n_tile_start =
      kEpilogue == Epilogue::kSwiGLU ? n_tile * (kBN / 2) : n_tile * kBN;

  // Global row of B for local n (kBKContig): the SwiGLU interleave or the plain tile.
  auto b_weight_row = [&](int n_local) -> int64_t {
    if constexpr (kEpilogue == Epilogue::kSwiGLU) {
      const int w = n_local % 32;
      const int64_t j = n_tile_start + (n_local / 32) * 16 + (w % 16);
      if (j >= p.intermediate) return -1;
      return w < 16 ? j : p.intermediate + j;
    } else {
      const int64_t n = n_tile_start + n_local;
      return n < p.n_size ? n : -1;
    }
  };

  auto load_stage = [&](int stage, int kt) {
    uint16_t* sa = smem + stage * 2 * kTileElems;
    uint16_t* sb = sa + kTileElems;
    const int64_t k0 = static_cast<int64_t>(kt) * kBK;
    if constexpr (kAKContig) {  // A: [m][k], rows of the expert
      load_tile<kBM, kBK>(
          sa,
          [&](int o) -> const uint16_t* {
            const int64_t m = m_tile_start + o;
            return m < row_end ? a_base + m * p.lda : nullptr;
          },
          k0, k_extent, p.vector_ok);
    } else {  // A: [k][m], k = the expert's rows
      load_tile<kBK, kBM>(
          sa,
          [&](int o) -> const uint16_t* {
            const int64_t r = row_begin + k0 + o;
            return r < row_end ? a_base + r * p.lda : nullptr;
          },
          m_tile_start, p.m_size, p.vector_ok);
    }
    if constexpr (kBKContig) {  // B: [n][k], weight rows
      load_tile<kBN, kBK>(
          sb,
          [&](int o) -> const uint16_t* {
            const int64_t row = b_weight_row(o);
            return row >= 0 ? b_base + row * p.ldb : nullptr;
          },
          k0, k_extent, p.vector_ok);
    } else if constexpr (kGrouping == Grouping::kRows) {  // B: [k][n], a weight used as is
      load_tile<kBK, kBN>(
          sb,
          [&](int o) -> const uint16_t* {
            const int64_t k = k0 + o;
            return k < k_extent ? b_base + k * p.ldb : nullptr;
          },
          n_tile_start, p.n_size, p.vector_ok);
    } else {  // B: [k][n], k = the expert's rows
      load_tile<kBK, kBN>(
          sb,
          [&](int o) -> const uint16_t* {
            const int64_t r = row_begin + k0 + o;
            return r < row_end ? b_base + r * p.ldb : nullptr;
          },
          n_tile_start, p.n_size, p.vector_ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // ---- kStages-deep pipeline: one group committed per stage, even when empty, so that
  // wait_group<kStages - 2> always means "the tile about to be used has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  const int q = lane / 8, i8 = lane % 8;
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt visible to all; stage (kt - 1) % kStages free for reuse
    const int next = kt + kStages - 1;
    if (next < num_k_tiles) load_stage(next % kStages, next);
    cp_async_commit();

    const uint16_t* sa = smem + (kt % kStages) * 2 * kTileElems;
    const uint16_t* sb = sa + kTileElems;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned a_frag[4][4];
      unsigned b_frag[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int m0 = warp_m * 64 + mt * 16;
        if constexpr (kAKContig) {  // [m][k]: rows m0 + lane % 16, k half lane / 16
          ldmatrix_x4<false>(a_frag[mt], sa + (m0 + lane % 16) * (kBK + kPad) + kk + (lane / 16) * 8);
        } else {  // [k][m]: matrices (m lo, k lo), (m hi, k lo), (m lo, k hi), (m hi, k hi)
          ldmatrix_x4<true>(a_frag[mt],
                            sa + (kk + i8 + (q / 2) * 8) * (kBM + kPad) + m0 + (q % 2) * 8);
        }
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int n0 = warp_n * 32 + np * 16;
        unsigned r[4];
        if constexpr (kBKContig) {  // [n][k]: (n lo, k lo), (n lo, k hi), (n hi, k lo), (n hi, k hi)
          ldmatrix_x4<false>(r, sb + (n0 + i8 + (q / 2) * 8) * (kBK + kPad) + kk + (q % 2) * 8);
        } else {  // [k][n]
          ldmatrix_x4<true>(r, sb + (kk + i8 + (q % 2) * 8) * (kBN + kPad) + n0 + (q / 2) * 8);
        }
        b_frag[2 * np][0] = r[0];
        b_frag[2 * np][1] = r[1];
        b_frag[2 * np + 1][0] = r[2];
        b_frag[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], a_frag[mt], b_frag[nt][0], b_frag[nt][1]);
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight when the block exits

  // ---- epilogue. Thread holds acc[mt][nt][half * 2 + c] for
  //   row  warp_m * 64 + mt * 16 + lane / 4 + half * 8,  column  warp_n * 32 + nt * 8 + 2 * (lane % 4) + c
  const int64_t m_limit = kGrouping == Grouping::kRows ? row_end : p.m_size;
  T* c_base = p.c;
  if constexpr (kGrouping == Grouping::kReduction) c_base += static_cast<int64_t>(expert) * p.c_expert_stride;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m_tile_start + warp_m * 64 + mt * 16 + lane / 4 + half * 8;
      if (m >= m_limit) continue;
      if constexpr (kEpilogue == Epilogue::kSwiGLU) {
        // nt 0, 1: gate columns j; nt 2, 3: the up columns of the same j.
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int64_t j = n_tile_start + warp_n * 16 + nt * 8 + 2 * (lane % 4) + c;
            if (j >= p.intermediate) continue;
            store_swiglu(p, m, j, acc[mt][nt][half * 2 + c], acc[mt][nt + 2][half * 2 + c]);
          }
        }
      } else if constexpr (kEpilogue == Epilogue::kStore) {
        // Each thread owns two adjacent columns: one 4-byte store where alignment allows.
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int64_t n = n_tile_start + warp_n * 32 + nt * 8 + 2 * (lane % 4);
          if (n >= p.n_size) continue;
          T* dst = c_base + m * p.ldc + n;
          const T v0 = from_f32<T>(acc[mt][nt][half * 2]);
          const T v1 = from_f32<T>(acc[mt][nt][half * 2 + 1]);
          if (p.pair_store_ok && n + 1 < p.n_size) {
            *reinterpret_cast<StorePair<T>*>(dst) = StorePair<T>{v0, v1};
          } else {
            dst[0] = v0;
            if (n + 1 < p.n_size) dst[1] = v1;
          }
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int64_t n = n_tile_start + warp_n * 32 + nt * 8 + 2 * (lane % 4) + c;
            if (n >= p.n_size) continue;
            store_swiglu_backward(p, m, n, acc[mt][nt][half * 2 + c]);  // v = d_act[m, n]
          }
        }
      }
    }
  }
}

// Sets rows [offsets[E], num_rows) of x (row stride ld, `cols` columns) to zero: the dropped
// pairs. offsets[E] is read on the device; blocks stride over the rows.
template <typename T>
__global__ void zero_dropped_rows_kernel(T* x, int64_t ld, int64_t cols, const int32_t* offsets,
                                         int num_experts, int64_t num_rows) {
  const int64_t first = clamp_index(offsets[num_experts], 0, num_rows);
  for (int64_t r = first + blockIdx.x; r < num_rows; r += gridDim.x) {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) x[r * ld + c] = from_f32<T>(0.0f);
  }
}

// Launches one grouped GEMM on `stream` (kSmemBytes of dynamic shared memory). The grid is sized
// from host-side extents only (rows, E, m/n sizes): no offsets are read on the host.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
void launch_grouped_gemm_sm80(const GroupedGemmParams<T>& p, cudaStream_t stream) {
  auto* kernel = grouped_gemm_kernel<T, kGrouping, kBKContig, kEpilogue>;
  // Opt in to > 48 KiB of dynamic shared memory once per device (not on every launch: the first
  // launches usually happen before any CUDA-graph capture).
  static std::atomic<bool> configured[kMaxDevices] = {};
  int device = 0;
  FLASHDELTA_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices || !configured[device].load(std::memory_order_acquire)) {
    FLASHDELTA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    // Two blocks per SM need the largest shared-memory carve-out (the loads bypass L1 anyway).
    FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    if (device < kMaxDevices) configured[device].store(true, std::memory_order_release);
  }
  const int64_t n_tiles = kEpilogue == Epilogue::kSwiGLU
                              ? (p.intermediate + kBN / 2 - 1) / (kBN / 2)
                              : (p.n_size + kBN - 1) / kBN;
  GroupedGemmParams<T> q = p;
  dim3 grid(1, 1, 1);
  if constexpr (kGrouping == Grouping::kRows) {
    // Column tiles along x, the fastest-dispatched dimension: the n_tiles blocks of a row tile
    // run together and share its A rows in L2, and an expert's row tiles follow one another,
    // sharing its weight slab. (With row tiles fastest, every column tile re-read all of A from
    // DRAM: 8x the 256 MB of A in the first GEMM at 35B-A3B sizes, 16x in the d_hidden GEMM.)
    const int64_t row_tiles = (p.num_rows + kBM - 1) / kBM + p.num_experts;
    if (row_tiles > 65535) {  // gridDim.y's limit: about 8 M rows (1 M tokens at top-8)
      throw Error(Error::Kind::kValue,
                  "moe_experts: " + std::to_string(p.num_rows) + " rows and " +
                      std::to_string(p.num_experts) + " experts exceed one grouped GEMM launch " +
                      "(at most 65535 tiles of 128 rows, plus one per expert): split the batch");
    }
    grid.x = static_cast<unsigned>(n_tiles);
    grid.y = static_cast<unsigned>(row_tiles);
  } else {
    grid.x = static_cast<unsigned>((p.m_size + kBM - 1) / kBM);
    grid.y = static_cast<unsigned>(n_tiles);
    grid.z = static_cast<unsigned>(p.num_experts);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n_tiles == 0) return;
  q.pair_store_ok = reinterpret_cast<uintptr_t>(p.c) % (2 * sizeof(T)) == 0 && p.ldc % 2 == 0 &&
                    p.c_expert_stride % 2 == 0;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(q);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

// Zeroes the dropped rows [offsets[E], num_rows) of a [num_rows, cols] matrix.
template <typename T>
void launch_zero_dropped_rows(T* x, int64_t ld, int64_t cols, const int32_t* offsets,
                              int num_experts, int64_t num_rows, cudaStream_t stream) {
  if (num_rows == 0 || cols == 0) return;
  const unsigned blocks = static_cast<unsigned>(num_rows < 1024 ? num_rows : 1024);
  zero_dropped_rows_kernel<T><<<blocks, 256, 0, stream>>>(x, ld, cols, offsets, num_experts,
                                                          num_rows);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda::moe
