// Hopper (sm_90a) grouped GEMM, persistent, with 128 x 128 tiles that each consumer warpgroup
// computes whole, the two warpgroups alternating ("ping-pong"): the same problems, groupings and
// epilogues as moe_grouped_gemm.cuh, moe_grouped_gemm_sm90.cuh and moe_grouped_gemm_sm90_wide.cuh
// (read those notes first; this one says what differs and why). FLASHDELTA_MOE_GEMM=sm90-pingpong.
//
// Why. In the wide kernel both consumer warpgroups share a tile: they finish its main loop
// together and run its epilogue together, and for that time the tensor cores idle. The SwiGLU
// epilogues are the long ones (forward: gate_up and act stores, 1.5x the plain store's bytes;
// backward: a gate_up read and d_gate_up + act stores, 3x), and those two GEMMs measured slower
// wide than at 128 x 128 (H100: 42% / 34% of the matmul rate against 46% / 40%). Here consumer
// g takes the block's tiles g, g + 2, ...: while one warpgroup runs a tile's epilogue the other
// runs the next tile's main loop, so the MMAs of one overlap the epilogue of the other.
//
// Block: 384 threads, three warpgroups, as the wide kernel: warpgroup 0 the producer (40
// registers; one lane issues the TMA loads), warpgroups 1 and 2 the consumers (232 registers).
// A consumer's tile is two 64-row halves, each m64n128k16 MMAs into its own 64 fp32
// accumulators (128 a thread: the wide kernel's count); per k16 step both halves share B's
// descriptor. A 128 x 128 tile reads 32 KiB a k-step for 2.1 MFLOP (the 128-wide kernel's
// ratio), so a stage is 32 KiB: [A rows 0-63, A rows 64-127, B 0-63, B 64-127] (boxes and
// descriptors of the 128-wide kernel), six stages (192 KiB), then 8 KiB of epilogue staging a
// consumer and the wide kernel's row-tile table.
//
// The MMA turn. The producer fills the ring with the block's tiles in order; each stage is
// consumed by the warpgroup that owns its tile (its empty barrier counts that warpgroup's 4
// warps) and each consumer advances its ring position over the other's tiles too. The full
// barriers are waited on by parity, which tells phase u from phase u - 2 only if use u - 1 of
// the stage has already been waited on: a consumer that ran ahead onto its next tile's stages
// while the other had not reached the stages in between would take a stale phase for a fresh
// one. So the main loops take turns, in tile order: a consumer starts a tile's main loop only
// after the other has waited on the last stage of the previous tile (named barriers 4: 0 -> 1
// and 5: 1 -> 0; bar.arrive by the one finishing, bar.sync by the one starting; an arrive only
// when the block has a next tile, so every arrive meets its sync). The turn passes when the
// last MMAs are issued: the next tile's first MMAs queue behind them while the finishing
// warpgroup drains its pipeline and runs its epilogue.
//
// Tiles and order: the wide kernel's (kRows: the row-tile table and row tile-major order;
// kReduction: (expert, m-tile, n-tile), n fastest), at 128 columns (kSwiGLU: 64 act columns,
// boxes gate j0 and up I + j0: a thread's accumulator columns c and c + 64 are gate and up of
// the same j, as in the 128-wide kernel). Blocks take tiles blockIdx.x, + gridDim.x, ...
// Every output tile is computed by one warpgroup in a fixed k order: deterministic, no atomics.
//
// Bounds: as the wide kernel. A half wholly past the tile's rows is not loaded but is still
// multiplied (stale shared memory; its rows are never stored): keeping the MMAs unconditional
// keeps them on a path ptxas knows to be uniform. kReduction zeroes the rows past the expert's
// end in the last k-step (the owning warpgroup alone: fence.proxy.async, its named barrier).
//
// Epilogues, per 64-row half (staging 64 rows of 128 bytes, 16-byte chunks XOR-swizzled by
// row % 8): plain store in two rounds of 64 columns, rows leaving as 16-byte stores; SwiGLU
// forward from the registers in column pairs; SwiGLU backward in four rounds of 32 columns of
// fp32 d_act, 8 columns a thread and item, 16-byte gate / up loads one round ahead, gate_up
// prefetched into L2 four k-steps before the end of the main loop.
//
// Assumes: as the wide kernel (sm_90a; bf16 or fp16; TMA-compatible operands; the table fits in
// shared memory after the ring: E up to ~1400 on an H100; N < 2^31).
#pragma once

#include <cuda.h>  // CUtensorMap (type only)

#include <atomic>
#include <cstdint>

#include "cuda/device_info.cuh"
#include "cuda/moe_grouped_gemm.cuh"
#include "cuda/moe_grouped_gemm_sm90.cuh"
#include "cuda/moe_grouped_gemm_sm90_wide.cuh"

namespace flashdelta::detail::cuda::moe::sm90_pingpong {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kBox = sm90::kBox;  // 64 x 64 elements, 128-byte rows
constexpr int kBoxBytes = sm90::kBoxBytes;
constexpr int kABoxes = kBM / kBox, kBBoxes = kBN / kBox;
constexpr int kStageBytes = (kABoxes + kBBoxes) * kBoxBytes;  // 32 KiB
constexpr int kStages = 6;
constexpr int kRingBytes = kStages * kStageBytes;
constexpr int kStagingBytes = 64 * 128;  // per consumer warpgroup: 64 rows of 128 bytes
constexpr int kTableOffset = kRingBytes + 2 * kStagingBytes;
constexpr int kThreads = 3 * 128;
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;  // 128 x 40 + 256 x 232 <= 64 K
constexpr int kPrefetchSteps = 4;  // SwiGLU backward: prefetch gate_up this many k-steps ahead
static_assert(kBM == sm90_wide::kBM && kThreads == sm90_wide::kThreads,
              "the wide kernel's row-tile table counts 128-row tiles with 384 threads");

// Dynamic shared memory of one block: slack to align the ring to 1 KiB, ring, staging, table.
inline int smem_bytes(Grouping grouping, int num_experts) {
  const int table = grouping == Grouping::kRows ? 3 * (num_experts + 1) * 4 : 0;
  return 1024 + kTableOffset + table;
}

using sm90::fence_accumulators;
using sm90::mbarrier_arrive;
using sm90::mbarrier_arrive_expect_tx;
using sm90::mbarrier_init;
using sm90::mbarrier_wait;
using sm90::smem_descriptor;
using sm90::smem_u32;
using sm90::tma_load_2d;
using sm90::tma_load_3d;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_m64n128k16;
using sm90::wgmma_wait;
using sm90_wide::named_barrier;
using sm90_wide::setmaxnreg_dec;
using sm90_wide::setmaxnreg_inc;
using sm90_wide::TileInfo;

// Arrives on named barrier `kId` (of `kCount` threads) without waiting for it.
template <int kId, int kCount>
__device__ __forceinline__ void named_barrier_arrive() {
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
}

// What one consumer thread needs to find its part of a 64-row half of a tile.
struct HalfView {
  int64_t row0;          // the half's first row (kRows) / m (kReduction)
  int row_in_group;      // + 8 i: the thread's accumulator rows within the half
  int lane;
  int thread_in_group;   // 0..127
  uint8_t* staging;      // the warpgroup's 8 KiB
};

// ---- epilogues of one 64 x 128 half. The thread holds acc[4 j + 2 i + c] (j < 16) for
//   row  row0 + row_in_group + 8 i,  column  n_tile_start + 8 j + 2 (lane % 4) + c
// `has_k` false: the accumulators were never written (an expert without rows, kReduction):
// the values are zeros. `group_barrier` synchronises the warpgroup.

template <typename T, bool kReduction, typename Barrier>
__device__ __forceinline__ void store_half(const GroupedGemmParams<T>& p, const TileInfo& t,
                                           const float (&acc)[64], bool has_k, const HalfView& v,
                                           Barrier group_barrier) {
  const auto value = [&](int i) { return has_k ? acc[i] : 0.0f; };
  T* c_base = p.c;
  if constexpr (kReduction) c_base += static_cast<int64_t>(t.expert) * p.c_expert_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // 64 columns a round
    if (t.n_tile_start + 64 * r >= p.n_size) break;  // uniform
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = v.row_in_group + 8 * i;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int j = 8 * r + jj;
        uint8_t* const dst = v.staging + row * 128 + ((jj ^ (row % 8)) * 16) + (v.lane % 4) * 4;
        *reinterpret_cast<StorePair<T>*>(dst) =
            StorePair<T>{from_f32<T>(value(4 * j + 2 * i)), from_f32<T>(value(4 * j + 2 * i + 1))};
      }
    }
    group_barrier();
#pragma unroll
    for (int step = 0; step < 4; ++step) {  // 64 rows x 8 chunks of 8 columns
      const int q = v.thread_in_group + 128 * step;
      const int row = q / 8, chunk = q % 8;
      const uint4 w =
          *reinterpret_cast<const uint4*>(v.staging + row * 128 + ((chunk ^ (row % 8)) * 16));
      const int64_t m = v.row0 + row;
      const int64_t n = t.n_tile_start + 64 * r + chunk * 8;
      if (m >= t.m_limit || n >= p.n_size) continue;
      T* dst = c_base + m * p.ldc + n;
      if (p.vector_store_ok && n + 8 <= p.n_size) {
        *reinterpret_cast<uint4*>(dst) = w;
      } else {  // element by element: the 16 bytes as four pairs
        const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          StorePair<T> pair;
          memcpy(&pair, &words[k], sizeof(pair));
          if (n + 2 * k < p.n_size) dst[2 * k] = pair.x;
          if (n + 2 * k + 1 < p.n_size) dst[2 * k + 1] = pair.y;
        }
      }
    }
    group_barrier();  // the staging is rewritten by the next round (or half, or tile)
  }
}

// Columns 0-63: gate j0 + c; columns 64-127: the up columns of the same j.
template <typename T>
__device__ __forceinline__ void swiglu_half(const GroupedGemmParams<T>& p, const TileInfo& t,
                                            const float (&acc)[64], const HalfView& v) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t m = v.row0 + v.row_in_group + 8 * i;
    if (m >= t.m_limit) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t col = t.n_tile_start + 8 * j + 2 * (v.lane % 4);
      if (col >= p.intermediate) continue;
      const float g0 = acc[4 * j + 2 * i], g1 = acc[4 * j + 2 * i + 1];
      const float u0 = acc[4 * (j + 8) + 2 * i], u1 = acc[4 * (j + 8) + 2 * i + 1];
      if (p.pair_store_ok && col + 1 < p.intermediate) {
        store_swiglu_pair(p, m, col, g0, u0, g1, u1);
      } else {
        store_swiglu(p, m, col, g0, u0);
        if (col + 1 < p.intermediate) store_swiglu(p, m, col + 1, g1, u1);
      }
    }
  }
}

// acc = d_act. Round r: columns [32 r, 32 r + 32) of the half, in fp32 in the staging. Item b
// of a round: row thread_in_group / 4 + 32 b, columns 8 (thread_in_group % 4).. of the round.
template <typename T, typename Barrier>
__device__ __forceinline__ void swiglu_backward_half(const GroupedGemmParams<T>& p,
                                                     const TileInfo& t, const float (&acc)[64],
                                                     const HalfView& v, Barrier group_barrier) {
  const int item_col = 8 * (v.thread_in_group % 4);
  int64_t gate_up_offset[2], act_offset[2];
  bool row_ok[2];
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    const int64_t m = v.row0 + v.thread_in_group / 4 + 32 * b;
    row_ok[b] = m < t.m_limit;
    gate_up_offset[b] = m * p.ld_gate_up;
    act_offset[b] = m * p.ld_act;
  }
  uint4 gate[2][2], up[2][2];  // [round parity][item]: a round's loads issued one ahead
  const auto load_round = [&](int r, uint4 (&g)[2], uint4 (&u)[2]) {
    const int64_t n = t.n_tile_start + 32 * r + item_col;
    if (!p.vector_store_ok || n + 8 > p.n_size) return;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (row_ok[b]) {
        const T* gate_up_row = p.gate_up + gate_up_offset[b];
        g[b] = *reinterpret_cast<const uint4*>(gate_up_row + n);
        u[b] = *reinterpret_cast<const uint4*>(gate_up_row + p.intermediate + n);
      }
    }
  };
  load_round(0, gate[0], up[0]);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    if (t.n_tile_start + 32 * r >= p.n_size) break;  // uniform
    if (r + 1 < 4) load_round(r + 1, gate[(r + 1) % 2], up[(r + 1) % 2]);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = v.row_in_group + 8 * i;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = 4 * r + jj;
        const int col = 8 * jj + 2 * (v.lane % 4);  // within the round, even
        *reinterpret_cast<float2*>(v.staging + row * 128 + (((col / 4) ^ (row % 8)) * 16) +
                                   (col % 4) * 4) = make_float2(acc[4 * j + 2 * i], acc[4 * j + 2 * i + 1]);
      }
    }
    group_barrier();
    const int64_t n = t.n_tile_start + 32 * r + item_col;
    const bool vector = p.vector_store_ok && n + 8 <= p.n_size;  // as load_round
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      if (!row_ok[b] || n >= p.n_size) continue;
      const int row = v.thread_in_group / 4 + 32 * b;
      const float4 lo = *reinterpret_cast<const float4*>(
          v.staging + row * 128 + (((item_col / 4) ^ (row % 8)) * 16));
      const float4 hi = *reinterpret_cast<const float4*>(
          v.staging + row * 128 + (((item_col / 4 + 1) ^ (row % 8)) * 16));
      const float d[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      if (vector) {
        const uint4 gw = gate[r % 2][b], uw = up[r % 2][b];
        const uint32_t g_words[4] = {gw.x, gw.y, gw.z, gw.w};
        const uint32_t u_words[4] = {uw.x, uw.y, uw.z, uw.w};
        uint32_t d_g[4], d_u[4], act_words[4];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          StorePair<T> g, u, dg, du, a;
          memcpy(&g, &g_words[w], sizeof(g));
          memcpy(&u, &u_words[w], sizeof(u));
          swiglu_backward_values<T>(d[2 * w], g.x, u.x, dg.x, du.x, a.x);
          swiglu_backward_values<T>(d[2 * w + 1], g.y, u.y, dg.y, du.y, a.y);
          memcpy(&d_g[w], &dg, sizeof(dg));
          memcpy(&d_u[w], &du, sizeof(du));
          memcpy(&act_words[w], &a, sizeof(a));
        }
        T* d_row = p.d_gate_up + gate_up_offset[b];
        *reinterpret_cast<uint4*>(d_row + n) = make_uint4(d_g[0], d_g[1], d_g[2], d_g[3]);
        *reinterpret_cast<uint4*>(d_row + p.intermediate + n) =
            make_uint4(d_u[0], d_u[1], d_u[2], d_u[3]);
        if (p.act != nullptr) {
          *reinterpret_cast<uint4*>(p.act + act_offset[b] + n) =
              make_uint4(act_words[0], act_words[1], act_words[2], act_words[3]);
        }
      } else {  // element by element (unaligned operands or the last columns)
        const int64_t m = v.row0 + row;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (n + e < p.n_size) store_swiglu_backward(p, m, n + e, d[e]);
        }
      }
    }
    group_barrier();  // the staging is rewritten by the next round (or half, or tile)
  }
}

// ---- the kernel

template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, 1)
grouped_gemm_sm90_pingpong_kernel(const __grid_constant__ CUtensorMap tmap_a,
                                  const __grid_constant__ CUtensorMap tmap_b,
                                  const GroupedGemmParams<T> p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kReduction = kGrouping == Grouping::kReduction;
  constexpr bool kATrans = kReduction;  // A M-major (weight gradients)
  constexpr bool kBTrans = !kBKContig;  // B N-major (weights as stored, or row matrices)
  static_assert(!kReduction || !kBKContig, "weight-gradient GEMMs read both operands along m / n");
  static_assert(kEpilogue != Epilogue::kSwiGLU || kBKContig, "the SwiGLU GEMM reads W1 K-major");

  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ __align__(8) uint64_t empty_bar[kStages];
  const uint32_t ring = (smem_u32(smem_raw) + 1023u) & ~1023u;  // the swizzle needs 1 KiB
  uint8_t* const ring_ptr = smem_raw + (ring - smem_u32(smem_raw));
  int32_t* const first_tile = reinterpret_cast<int32_t*>(ring_ptr + kTableOffset);  // [E + 1]
  int32_t* const row_begin = first_tile + (p.num_experts + 1);                       // [E]
  int32_t* const row_end = row_begin + (p.num_experts + 1);                          // [E]

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  // Broadcast from lane 0: ptxas then knows the role is warp-uniform (C7518, see the wide kernel).
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(smem_u32(&full_bar[s]), 1);   // the producer's arrive (+ the TMA bytes)
      mbarrier_init(smem_u32(&empty_bar[s]), 4);  // one arrive per warp of the owning consumer
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  } else if (threadIdx.x == 32) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_b)) : "memory");
  }

  const int64_t n_tiles = kEpilogue == Epilogue::kSwiGLU
                              ? (p.intermediate + kBN / 2 - 1) / (kBN / 2)
                              : (p.n_size + kBN - 1) / kBN;
  int64_t num_tiles;
  if constexpr (kReduction) {
    num_tiles = static_cast<int64_t>(p.num_experts) * ((p.m_size + kBM - 1) / kBM) * n_tiles;
    __syncthreads();  // the barriers' initialisation
  } else {
    sm90_wide::build_row_tile_table(p.offsets, p.num_experts, p.num_rows, first_tile, row_begin,
                                    row_end);
    num_tiles = static_cast<int64_t>(first_tile[p.num_experts]) * n_tiles;
  }
  const auto tile_at = [&](int64_t tile) {
    return sm90_wide::locate_tile<kGrouping, kEpilogue, kBN>(p, tile, n_tiles, first_tile,
                                                             row_begin, row_end);
  };

  // ---- producer: warpgroup 0, one lane; every tile of the block in order
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    int it = 0;  // k-steps issued by this block, over all its tiles: the ring position
    for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const TileInfo t = tile_at(tile);
      // The second B box is skipped when it lies wholly past n (its columns are not stored).
      const int b_boxes =
          kEpilogue == Epilogue::kSwiGLU || t.n_tile_start + kBox < p.n_size ? 2 : 1;
      const auto stage_bytes = static_cast<uint32_t>((t.active_groups + b_boxes) * kBoxBytes);
      const auto e = static_cast<int32_t>(t.expert);
      for (int kt = 0; kt < t.num_k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        if (it >= kStages) mbarrier_wait(smem_u32(&empty_bar[s]), ((it / kStages) - 1) & 1);
        const uint32_t bar = smem_u32(&full_bar[s]);
        mbarrier_arrive_expect_tx(bar, stage_bytes);
        const uint32_t sa = ring + static_cast<uint32_t>(s * kStageBytes);
        const uint32_t sb = sa + kABoxes * kBoxBytes;
        const auto k0 = static_cast<int32_t>(kt * kBK);
        // Coordinates are innermost first and fit in int32 (N < 2^31, extents < 2^31).
        for (int g = 0; g < t.active_groups; ++g) {
          const uint32_t dst = sa + static_cast<uint32_t>(g * kBoxBytes);
          const auto m0 = static_cast<int32_t>(t.m_tile_start + g * kBox);
          if constexpr (kReduction) {  // A = [rows][m]: (64 m) x (64 rows of the expert)
            tma_load_2d(dst, &tmap_a, bar, m0, static_cast<int32_t>(t.row_begin + k0));
          } else {  // A = [rows][k]
            tma_load_2d(dst, &tmap_a, bar, k0, m0);
          }
        }
        for (int h = 0; h < b_boxes; ++h) {
          const uint32_t dst = sb + static_cast<uint32_t>(h * kBoxBytes);
          if constexpr (kReduction) {  // B = [rows][n]
            tma_load_2d(dst, &tmap_b, bar, static_cast<int32_t>(t.n_tile_start + h * kBox),
                        static_cast<int32_t>(t.row_begin + k0));
          } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {  // gate rows j0.., up I + j0..
            const int64_t row = t.n_tile_start + (h == 0 ? 0 : p.intermediate);
            tma_load_3d(dst, &tmap_b, bar, k0, static_cast<int32_t>(row), e);
          } else if constexpr (kBKContig) {  // B = [E][n][k]
            tma_load_3d(dst, &tmap_b, bar, k0, static_cast<int32_t>(t.n_tile_start + h * kBox), e);
          } else {  // B = [E][k][n]
            tma_load_3d(dst, &tmap_b, bar, static_cast<int32_t>(t.n_tile_start + h * kBox), k0, e);
          }
        }
      }
    }
    return;
  }

  // ---- consumers: warpgroups 1 and 2, alternate tiles
  setmaxnreg_inc<kConsumerRegisters>();
  const int group = warpgroup - 1;  // this consumer takes the block's tiles group, group + 2, ...
  const int thread_in_group = static_cast<int>(threadIdx.x) % 128;
  uint8_t* const staging = ring_ptr + kRingBytes + group * kStagingBytes;
  const auto group_barrier = [&]() {
    if (group == 0) {
      named_barrier<2, 128>();
    } else {
      named_barrier<3, 128>();
    }
  };
  HalfView view;
  view.row_in_group = (warp % 4) * 16 + lane / 4;
  view.lane = lane;
  view.thread_in_group = thread_in_group;
  view.staging = staging;

  int it = 0;         // the ring position (the producer's sequence, the other's tiles included)
  int64_t local = 0;  // the tile's index among the block's tiles
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x, ++local) {
    const TileInfo t = tile_at(tile);
    if (static_cast<int>(local % 2) != group) {  // the other consumer's tile
      it += t.num_k_tiles;
      continue;
    }
    // Wait for the MMA turn: the other consumer has waited on every stage of tile local - 1.
    if (local > 0) {
      if (group == 0) {
        named_barrier<5, 256>();
      } else {
        named_barrier<4, 256>();
      }
    }
    // No zero-initialisation: the first MMA overwrites (scale-d = 0); see the 128-wide kernel.
    float acc0[64], acc1[64];  // rows 0-63 and 64-127 of the tile
    for (int kt = 0; kt < t.num_k_tiles; ++kt, ++it) {
      const int s = it % kStages;
      mbarrier_wait(smem_u32(&full_bar[s]), (it / kStages) & 1);
      const uint32_t sa = ring + static_cast<uint32_t>(s * kStageBytes);
      const uint32_t sb = sa + kABoxes * kBoxBytes;
      if constexpr (kReduction) {
        const int64_t valid = t.k_extent - static_cast<int64_t>(kt) * kBK;  // rows of this step
        if (valid < kBK) {  // uniform over the warpgroup
          // Zero rows [valid, 64) of every box of the stage (the next expert's rows; a row is
          // one k, 128 bytes, so the swizzle never moves data across rows). Boxes not loaded
          // in this step are zeroed too: harmless, no TMA writes this stage until released.
          const int first = static_cast<int>(valid);
          const int chunks_per_box = (kBox - first) * 8;  // 16-byte chunks
          uint8_t* const stage_ptr = ring_ptr + s * kStageBytes;
          const int chunks = (kABoxes + kBBoxes) * chunks_per_box;
          for (int c = thread_in_group; c < chunks; c += 128) {
            const int box = c / chunks_per_box, within = c % chunks_per_box;
            *reinterpret_cast<uint4*>(stage_ptr + box * kBoxBytes + first * 128 + within * 16) =
                make_uint4(0u, 0u, 0u, 0u);
          }
          // Generic-proxy writes before async-proxy (wgmma) reads: fence, then meet.
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          group_barrier();
        }
      }
      fence_accumulators(acc0);
      fence_accumulators(acc1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        const uint64_t desc_b = kBTrans ? smem_descriptor(sb + kk * 2048, kBoxBytes, 1024)
                                        : smem_descriptor(sb + kk * 32, 16, 1024);
        const uint32_t a0 = sa, a1 = sa + kBoxBytes;
        const uint64_t desc_a0 = kATrans ? smem_descriptor(a0 + kk * 2048, kBoxBytes, 1024)
                                         : smem_descriptor(a0 + kk * 32, 16, 1024);
        const uint64_t desc_a1 = kATrans ? smem_descriptor(a1 + kk * 2048, kBoxBytes, 1024)
                                         : smem_descriptor(a1 + kk * 32, 16, 1024);
        const int accumulate = kt > 0 || kk > 0;
        wgmma_m64n128k16<T, kATrans, kBTrans>(acc0, desc_a0, desc_b, accumulate);
        wgmma_m64n128k16<T, kATrans, kBTrans>(acc1, desc_a1, desc_b, accumulate);
      }
      wgmma_commit();
      fence_accumulators(acc0);
      fence_accumulators(acc1);
      if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
        if (kt == (t.num_k_tiles > kPrefetchSteps ? t.num_k_tiles - kPrefetchSteps : 0)) {
          // The epilogue's gate_up lines into L2: thread r of the warpgroup takes row r of the
          // tile, its 128 gate and 128 up columns (two 128-byte lines each).
          const int64_t m = t.m_tile_start + thread_in_group;
          if (m < t.m_limit) {
            const T* gate_up_row = p.gate_up + m * p.ld_gate_up;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t n = t.n_tile_start + 64 * h;
              if (n < p.n_size) {
                asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gate_up_row + n));
                asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gate_up_row + p.intermediate + n));
              }
            }
          }
        }
      }
      // Keep this k-step's MMAs in flight; the previous step's have completed: release its stage.
      wgmma_wait<1>();
      fence_accumulators(acc0);
      fence_accumulators(acc1);
      if (kt > 0 && lane == 0) mbarrier_arrive(smem_u32(&empty_bar[(it - 1) % kStages]));
    }
    // Every stage of this tile has been waited on: pass the MMA turn (only when the block has a
    // next tile, whose owner syncs on it).
    if (tile + gridDim.x < num_tiles) {
      if (group == 0) {
        named_barrier_arrive<4, 256>();
      } else {
        named_barrier_arrive<5, 256>();
      }
    }
    wgmma_wait<0>();  // (nothing pending without k-steps; unconditional: see the wide kernel)
    fence_accumulators(acc0);
    fence_accumulators(acc1);
    if (t.num_k_tiles > 0 && lane == 0) mbarrier_arrive(smem_u32(&empty_bar[(it - 1) % kStages]));

    // ---- epilogue, half by half (a half wholly past m_limit stores nothing)
    const bool has_k = !kReduction || t.num_k_tiles > 0;  // kRows: K > 0 (see the launcher)
    if constexpr (kEpilogue == Epilogue::kStore) {
      view.row0 = t.m_tile_start;
      store_half<T, kReduction>(p, t, acc0, has_k, view, group_barrier);
      view.row0 = t.m_tile_start + 64;
      store_half<T, kReduction>(p, t, acc1, has_k, view, group_barrier);
    } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {
      view.row0 = t.m_tile_start;
      swiglu_half(p, t, acc0, view);
      view.row0 = t.m_tile_start + 64;
      swiglu_half(p, t, acc1, view);
    } else {  // kSwiGLUBackward
      view.row0 = t.m_tile_start;
      swiglu_backward_half(p, t, acc0, view, group_barrier);
      view.row0 = t.m_tile_start + 64;
      swiglu_backward_half(p, t, acc1, view, group_barrier);
    }
  }
#else
  __trap();  // never launched: the host checks for the sm_90a binary first
#endif
}

// ---- host side

// Whether this instantiation's sm_90a code is what the current device runs (see
// sm90::sm90_kernel_ready); also opts in to the device's largest shared-memory allocation.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool pingpong_kernel_ready() {
  auto* kernel = grouped_gemm_sm90_pingpong_kernel<T, kGrouping, kBKContig, kEpilogue>;
  static std::atomic<int> state[kMaxDevices] = {};  // 0 unknown, 1 ready, 2 unavailable
  int device = 0;
  FLASHDELTA_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices) {
    const int known = state[device].load(std::memory_order_acquire);
    if (known != 0) return known == 1;
  }
  cudaFuncAttributes attr{};
  FLASHDELTA_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int optin =
      device_info(device).max_smem_per_block_optin - static_cast<int>(attr.sharedSizeBytes);
  const bool ready = attr.binaryVersion == 90 && attr.ptxVersion >= 90 &&
                     optin >= smem_bytes(kGrouping, 0);
  if (ready) {
    FLASHDELTA_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  }
  if (device < kMaxDevices) state[device].store(ready ? 1 : 2, std::memory_order_release);
  return ready;
}

// Launches one grouped GEMM on the ping-pong path; false (nothing launched) when it does not
// apply (as the wide kernel's launcher). The caller has checked that the device is sm_90.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool try_launch_grouped_gemm_sm90_pingpong(const GroupedGemmParams<T>& p, cudaStream_t stream) {
  if (!p.vector_ok || p.num_rows == 0 || p.num_experts == 0) return false;
  if (kGrouping == Grouping::kRows && p.k_size == 0) return false;  // the sm_80 path's zeros
  if (!pingpong_kernel_ready<T, kGrouping, kBKContig, kEpilogue>()) return false;
  auto* kernel = grouped_gemm_sm90_pingpong_kernel<T, kGrouping, kBKContig, kEpilogue>;
  const DeviceInfo& info = device_info();
  const int smem = smem_bytes(kGrouping, p.num_experts);
  // The static shared memory (barriers, scan) comes on top of the dynamic allocation.
  if (smem + 1024 > info.max_smem_per_block_optin) return false;
  const int64_t n_tiles = kEpilogue == Epilogue::kSwiGLU
                              ? (p.intermediate + kBN / 2 - 1) / (kBN / 2)
                              : (p.n_size + kBN - 1) / kBN;
  int64_t tiles_bound;  // at least the tile count, known on the host without the offsets
  if constexpr (kGrouping == Grouping::kRows) {
    if ((p.num_rows + kBM - 1) / kBM + p.num_experts > (int64_t{1} << 30)) return false;
    tiles_bound = ((p.num_rows + kBM - 1) / kBM + p.num_experts) * n_tiles;
  } else {
    tiles_bound = static_cast<int64_t>(p.num_experts) * ((p.m_size + kBM - 1) / kBM) * n_tiles;
  }
  if (tiles_bound == 0) return false;
  CUtensorMap map_a, map_b;
  if (!sm90::make_tensor_maps<T, kGrouping, kBKContig, kEpilogue>(p, &map_a, &map_b)) return false;
  const GroupedGemmParams<T> q = sm90::with_epilogue_flags<kEpilogue>(p);
  const int64_t blocks = tiles_bound < info.sm_count ? tiles_bound : info.sm_count;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(map_a, map_b, q);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  return true;
}

}  // namespace flashdelta::detail::cuda::moe::sm90_pingpong
