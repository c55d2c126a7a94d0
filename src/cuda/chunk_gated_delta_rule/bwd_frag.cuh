// Device helpers of the chunked backward's kernels (dstate.cu, grads.cu), beside common.cuh's and
// mma_frag.cuh's (A fragments from tiles or accumulators, named barriers): staged loads of strided
// activations (dO, any float dtype) into registers, so that a chunk's global reads are issued
// one step ahead and their latency hides behind the tensor-core work of the current step; and
// grads.cu's products of shared-memory tiles (gemm_apply) with their epilogues, on 8 or 16 warps.
#pragma once

#include <type_traits>

#include "cuda/chunk_gated_delta_rule/common.cuh"
#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace flashdelta::detail::cuda::chunk::bwd {

// Eight consecutive elements of a row as bf16, packed into one 16-byte value (element 0 in the
// low half of .x). `valid` elements are read (0..8), the rest are zero. `vec`: the eight
// elements are contiguous and 16-byte aligned (the caller checked strides and the pointer), so
// they come in one (bf16/fp16) or two (fp32) 16-byte loads; otherwise element by element with
// stride `stride`.
template <typename T>
__device__ __forceinline__ uint4 load8_bf16(const T* src, int64_t stride, int valid, bool vec) {
  float x[8];
  if (vec && valid == 8) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = reinterpret_cast<const float4*>(src)[0];
      const float4 b = reinterpret_cast<const float4*>(src)[1];
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z,
      x[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = to_f32(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = e < valid ? to_f32(src[e * stride]) : 0.f;
  }
  return make_uint4(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]), pack_bf16(x[4], x[5]),
                    pack_bf16(x[6], x[7]));
}

// Whether rows of a [B, T, H, D] tensor can be read eight elements at a time by 16-byte loads:
// unit last stride, the other strides and the pointer 16-byte aligned, D a multiple of 8.
template <typename T>
__host__ __device__ inline bool rows_vectorisable(const void* data, const int64_t* s, int D) {
  constexpr int64_t kPerVec = 16 / static_cast<int64_t>(sizeof(T));
  return s[3] == 1 && s[0] % kPerVec == 0 && s[1] % kPerVec == 0 && s[2] % kPerVec == 0 &&
         reinterpret_cast<uintptr_t>(data) % 16 == 0 && D % 8 == 0;
}

}  // namespace flashdelta::detail::cuda::chunk::bwd

namespace flashdelta::detail::cuda::chunk::bwd {

// Eight consecutive elements (stride `stride`) of a tensor whose float dtype is known only at
// run time, as packed bf16; `valid` of them are read, the rest are zero.
__device__ __forceinline__ uint4 load8_bf16_any(const void* base, DType dtype, int64_t offset,
                                                int64_t stride, int valid) {
  float x[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = e < valid ? load_float(base, dtype, offset + e * stride) : 0.f;
  return make_uint4(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]), pack_bf16(x[4], x[5]),
                    pack_bf16(x[6], x[7]));
}

}  // namespace flashdelta::detail::cuda::chunk::bwd

namespace flashdelta::detail::cuda::chunk::bwd {

// How gemm_apply spreads a 64-row product of N columns over kThreads / 32 warps: four bands of 16
// rows, the warps of a band (kColGroups of them, warp w in band w % 4, group w / 4) splitting the
// columns. A warp's kWarpCols columns go in kBlocks blocks of kBlockCols (at most 32, i.e. four n8
// tiles: one A fragment per k16 step feeds them all), each block's accumulators a [kTiles][4]
// array. 8 warps: N = 128 -> 2 blocks of 32; N = 64 -> 1 block of 32. 16 warps: N = 128 -> 1
// block of 32; N = 64 -> 1 block of 16 (two n8 tiles).
template <int N, int kThreads>
struct GemmLayout {
  static_assert(kThreads == 256 || kThreads == 512, "gemm_apply runs on 8 or 16 warps");
  static_assert(N == 64 || N == 128, "gemm_apply shapes");
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kColGroups = kWarps / 4;
  static constexpr int kWarpCols = N / kColGroups;
  static constexpr int kBlockCols = kWarpCols < 32 ? kWarpCols : 32;
  static constexpr int kTiles = kBlockCols / 8;
  static constexpr int kBlocks = kWarpCols / kBlockCols;
  static_assert(kTiles % 2 == 0, "B fragments come two n8 tiles per ldmatrix.x4");
};

// n8 tiles in an epilogue's accumulator block (decltype(acc) of a generic lambda).
template <typename Acc>
constexpr int kTilesOf = std::extent<std::remove_cv_t<std::remove_reference_t<Acc>>>::value;

// The operands of a product A B (A 64 x Kd, B Kd x N) are bf16 tiles in shared memory in the
// 128-byte swizzled layout (SwzTile, every tile 1024-byte aligned), stored as A [64][Kd] or, with
// kAT, A^T [Kd][64]; B [Kd][N] or, with kBT, B^T [N][Kd].
template <int N, int Kd, bool kAT, bool kBT>
struct Operands {
  using LA = SwzTile<kAT ? Kd : kC>;
  using LB = SwzTile<kBT ? N : Kd>;
};

// The k loop of one output block of a product on Hopper: acc (+)= A B over the whole of Kd for
// the columns n0 .. n0 + 8 NT of the warp's warpgroup (warps 4 g .. 4 g + 3 share n0; warp w % 4
// holds rows 16 (w % 4) ..), as Kd / 16 wgmma m64n(8 NT)k16 issued back to back, then waited for.
// Descriptors (cuda/wgmma.cuh): a K-major operand ([rows][k]: A, or B^T with kBT) advances 32
// bytes a k16 step within a box and a box (rows x 128 bytes) every four; an MN-major one ([k][..]:
// A^T, or B) advances 16 rows (2048 bytes) a step, its n0 a column offset inside a box. (The
// mma.sync version, mma_block below, loads every fragment by ldmatrix into registers: A four
// times over, once per warp of a band, and the fragments held ~24 registers at the 128 cap.)
template <int N, int Kd, bool kAT, bool kBT, int NT>
__device__ __forceinline__ void wgmma_block(float (&acc)[NT][4], const bf16* A, const bf16* B,
                                            int n0, bool accumulate) {
  static_assert(Kd % 64 == 0 && (kBT || 8 * NT <= 64), "wgmma_block shapes");
  const uint32_t a = shared_address(A), b = shared_address(B);
  fence_accumulators(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < Kd / 16; ++kk) {
    const uint32_t box = kk / 4, step = (kk % 4) * 32;
    const uint64_t da = kAT ? smem_descriptor(a + kk * 2048, 16, 1024)
                            : smem_descriptor(a + box * (kC * 128) + step, 16, 1024);
    const uint64_t db =
        kBT ? smem_descriptor(b + box * (N * 128) + n0 * 128 + step, 16, 1024)
            : smem_descriptor(b + (n0 / 64) * (Kd * 128) + kk * 2048 + (n0 % 64) * 2, 16, 1024);
    wgmma_bf16<NT, kAT, !kBT>(acc, da, db, accumulate || kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_accumulators(acc);
}

// The same on mma.sync (devices before sm_90a, where this kernel does not launch for want of
// shared memory, and FLASHDELTA_GRADS_MMA_SYNC builds, to compare): rows m0 .. m0 + 15, operands
// by ldmatrix from the swizzled tiles, one A fragment per k16 step serving the block's n8 tiles,
// the next step's fragments loaded before this step's products issue.
template <int N, int Kd, bool kAT, bool kBT, int NT>
__device__ __forceinline__ void mma_block(float (&acc)[NT][4], const bf16* A, const bf16* B,
                                          int m0, int n0) {
  static_assert(Kd % 32 == 0 && NT % 2 == 0, "mma_block shapes");
  using LA = typename Operands<N, Kd, kAT, kBT>::LA;
  using LB = typename Operands<N, Kd, kAT, kBT>::LB;
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  auto load = [&](uint32_t (&a)[4], uint32_t (&b)[NT / 2][4], int k0) {
    if constexpr (kAT) ldmatrix_x4_trans(a, A + LA::at(k0 + (j >> 1) * 8 + r, m0 + (j & 1) * 8));
    else ldmatrix_x4(a, A + LA::at(m0 + (j & 1) * 8 + r, k0 + (j >> 1) * 8));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      const int n = n0 + np * 16;
      if constexpr (kBT) ldmatrix_x4(b[np], B + LB::at(n + (j >> 1) * 8 + r, k0 + (j & 1) * 8));
      else ldmatrix_x4_trans(b[np], B + LB::at(k0 + (j & 1) * 8 + r, n + (j >> 1) * 8));
    }
  };
  auto mma = [&](const uint32_t (&a)[4], const uint32_t (&b)[NT / 2][4]) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      mma_bf16(acc[2 * np], a, b[np][0], b[np][1]);
      mma_bf16(acc[2 * np + 1], a, b[np][2], b[np][3]);
    }
  };
  uint32_t a0[4], b0[NT / 2][4], a1[4], b1[NT / 2][4];
  load(a0, b0, 0);
#pragma unroll 2
  for (int k0 = 0; k0 < Kd; k0 += 32) {
    load(a1, b1, k0 + 16);
    mma(a0, b0);
    if (k0 + 32 < Kd) load(a0, b0, k0 + 32);
    mma(a1, b1);
  }
}

// acc (+)= A B for the warp's output block (rows of band m0, columns n0 ..): wgmma where the
// build targets sm_90a, else mma.sync. accumulate: acc holds a starting value (else ignored).
template <int N, int Kd, bool kAT, bool kBT, int NT>
__device__ __forceinline__ void product_block(float (&acc)[NT][4], const bf16* A, const bf16* B,
                                              int m0, int n0, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(FLASHDELTA_GRADS_MMA_SYNC)
  wgmma_block<N, Kd, kAT, kBT>(acc, A, B, n0, accumulate);
#else
  if (!accumulate) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  }
  mma_block<N, Kd, kAT, kBT>(acc, A, B, m0, n0);
#endif
}

// A B for A 64 x Kd, B Kd x N (Operands: bf16 swizzled tiles in shared memory). Warps split the
// output as GemmLayout says (a warpgroup, warps 4 g .. 4 g + 3, takes column group g, its warps
// the four bands of 16 rows); each block's accumulators stay in registers over the whole of Kd.
// Each finished block goes to epilogue(blk, row, col, acc): acc[nt][0..1] are (row, col + 8 nt
// + 0..1), acc[nt][2..3] the same columns of row + 8; nt < kTilesOf<decltype(acc)>. The block
// loop is not unrolled: one copy of the main loop and of the epilogue per product, because the
// gradient kernel's 18 products inlined twice over no longer fit the instruction cache (ncu: a
// third of its stalls were instruction fetches). So blk is a run-time value: epilogues that keep
// results in registers across products select by it with a branch (add_rows), never index a
// register array with it.
// No synchronisation inside: callers sync before (operands written, and fenced for the async
// proxy: grads.cu's publish_tiles) and after (results read). Every warp of a warpgroup calls it.
template <int N, int Kd, bool kAT, bool kBT, int kThreads, typename Epilogue>
__device__ __forceinline__ void gemm_apply(const bf16* A, const bf16* B, Epilogue&& epilogue) {
  using L = GemmLayout<N, kThreads>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int m0 = (warp & 3) * 16;
#pragma unroll 1
  for (int blk = 0; blk < L::kBlocks; ++blk) {
    const int n0 = (warp >> 2) * L::kWarpCols + blk * L::kBlockCols;
    float acc[L::kTiles][4];
    product_block<N, Kd, kAT, kBT>(acc, A, B, m0, n0, false);
    epilogue(blk, m0 + g, n0 + 2 * t4, acc);
  }
}

// A product's per-thread result kept in registers for the next product of the same output layout
// to accumulate onto (gemm_apply_onto), in place of a round trip through an fp32 tile: one block
// per warp (GemmLayout::kBlocks == 1, true of N = 64 and N = 128 at 16 warps), kTiles x 4 floats.
template <int N, int kThreads>
using ChainTile = float[GemmLayout<N, kThreads>::kTiles][4];

// Epilogue helper: a block's results, each row r times row_mul(r) and each column c times
// col_mul(c), into a ChainTile.
template <int NT, typename RowMul, typename ColMul>
__device__ __forceinline__ void keep_scaled(float (&keep)[NT][4], int row, int col,
                                            const float (&acc)[NT][4], RowMul row_mul,
                                            ColMul col_mul) {
  const float lo = row_mul(row), hi = row_mul(row + 8);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float c0 = col_mul(col + 8 * nt), c1 = col_mul(col + 8 * nt + 1);
    keep[nt][0] = lo * acc[nt][0] * c0;
    keep[nt][1] = lo * acc[nt][1] * c1;
    keep[nt][2] = hi * acc[nt][2] * c0;
    keep[nt][3] = hi * acc[nt][3] * c1;
  }
}

// gemm_apply with the accumulators starting from `init` (a ChainTile the previous product of the
// same layout left in this thread's registers) instead of an fp32 tile: the products of a pair
// (dVn's, dT's) chain without writing and reading back 32 KB of shared memory, and need no
// barrier between them for it.
template <int N, int Kd, bool kAT, bool kBT, int kThreads, typename Epilogue>
__device__ __forceinline__ void gemm_apply_onto(const ChainTile<N, kThreads>& init, const bf16* A,
                                                const bf16* B, Epilogue&& epilogue) {
  using L = GemmLayout<N, kThreads>;
  static_assert(L::kBlocks == 1, "a chained product has one output block per warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m0 = (warp & 3) * 16, n0 = (warp >> 2) * L::kWarpCols;
  float acc[L::kTiles][4];
#pragma unroll
  for (int nt = 0; nt < L::kTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = init[nt][i];
  }
  product_block<N, Kd, kAT, kBT>(acc, A, B, m0, n0, true);
  epilogue(0, m0 + (lane >> 2), n0 + 2 * (lane & 3), acc);
}

// Epilogue: the block's results into an fp32 tile (row stride ld).
template <int NT>
__device__ __forceinline__ void store_f32(float* tile, int ld, int row, int col,
                                          const float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<float2*>(tile + row * ld + col + 8 * nt) = make_float2(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<float2*>(tile + (row + 8) * ld + col + 8 * nt) =
        make_float2(acc[nt][2], acc[nt][3]);
  }
}

// Epilogue: the block's results times `mul` into a bf16 swizzled tile of 64 rows (SwzTile<kC>).
template <int NT>
__device__ __forceinline__ void store_bf16(bf16* tile, int row, int col, const float (&acc)[NT][4],
                                           float mul) {
  using L = SwzTile<kC>;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(tile + L::at(row, col + 8 * nt)) =
        pack_bf16(mul * acc[nt][0], mul * acc[nt][1]);
    *reinterpret_cast<uint32_t*>(tile + L::at(row + 8, col + 8 * nt)) =
        pack_bf16(mul * acc[nt][2], mul * acc[nt][3]);
  }
}

// Epilogue helper: fn(row, col, x0, x1) for each pair of adjacent results (row, col .. col + 1)
// of a block, so that element-wise work on a product's result needs no round trip through shared
// memory.
template <int NT, typename Fn>
__device__ __forceinline__ void for_each_pair(int row, int col, const float (&acc)[NT][4], Fn fn) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    fn(row, col + 8 * nt, acc[nt][0], acc[nt][1]);
    fn(row + 8, col + 8 * nt, acc[nt][2], acc[nt][3]);
  }
}

// C (fp32 [64, N], row stride ldc) = A B (gemm_apply's operands).
template <int N, int Kd, bool kAT, bool kBT, int kThreads>
__device__ __forceinline__ void gemm_tile(float* C, int ldc, const bf16* A, const bf16* B) {
  gemm_apply<N, Kd, kAT, kBT, kThreads>(
      A, B, [&](int, int row, int col, const auto& acc) { store_f32(C, ldc, row, col, acc); });
}

// A 64 x 128 fp32 result kept in registers across products, in gemm_apply's layout for N = 128
// (block, n8 tile, fragment element): 32 registers per thread at 8 warps, 16 at 16 warps.
template <int kThreads>
using RegTile = float[GemmLayout<kD, kThreads>::kBlocks][GemmLayout<kD, kThreads>::kTiles][4];

// part += acc with rows times lo (row) and hi (row + 8).
template <int NT>
__device__ __forceinline__ void add_scaled(float (&part)[NT][4], const float (&acc)[NT][4],
                                           float lo, float hi) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    part[nt][0] += lo * acc[nt][0];
    part[nt][1] += lo * acc[nt][1];
    part[nt][2] += hi * acc[nt][2];
    part[nt][3] += hi * acc[nt][3];
  }
}

// Epilogue: adds the block's results, row r times mul(r), to a RegTile. blk is a run-time value
// (gemm_apply): a branch per block keeps the sum in registers, where sum[blk] would move it to
// local memory.
template <int NB, int NT, typename RowMul>
__device__ __forceinline__ void add_rows(float (&sum)[NB][NT][4], int blk, int row,
                                         const float (&acc)[NT][4], RowMul row_mul) {
  static_assert(NB == 1 || NB == 2, "a RegTile has one or two blocks per warp");
  const float lo = row_mul(row), hi = row_mul(row + 8);
  if constexpr (NB == 1) {
    add_scaled(sum[0], acc, lo, hi);
  } else {
    if (blk == 0) add_scaled(sum[0], acc, lo, hi);
    else add_scaled(sum[1], acc, lo, hi);
  }
}

}  // namespace flashdelta::detail::cuda::chunk::bwd
