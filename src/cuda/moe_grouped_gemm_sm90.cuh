// Hopper (sm_90a) grouped GEMM for the mixture-of-experts experts with 128 x 128 tiles
// (FLASHDELTA_MOE_GEMM=sm90-128; auto takes the persistent kernel of
// moe_grouped_gemm_sm90_wide.cuh first where it applies, which reuses this file's PTX wrappers,
// tensor maps and epilogue flags): the same problems, groupings and epilogues as
// moe_grouped_gemm.cuh (read its note first), on warpgroup MMA fed by TMA.
//
// Algorithm. One block computes one 128 x 128 output tile, K in steps of 64, through a 3-stage
// shared-memory ring:
//   - warp 8 is the producer: one lane issues the TMA loads of each stage (four 64 x 64 boxes:
//     two of A, one per consumer warpgroup, two of B) and arms the stage's "full" mbarrier with
//     their byte count;
//   - warps 0-3 and 4-7 are two consumer warpgroups; warpgroup w owns output rows
//     [64 w, 64 w + 64) and issues wgmma.mma_async m64n128k16 (fp32 accumulators, 64 per
//     thread) straight from shared memory, keeping one k-step of MMAs in flight, and releases a
//     stage (its "empty" mbarrier) once the MMAs that read it have completed. The first MMA of
//     a tile overwrites its accumulators (scale-d = 0) instead of adding to zeroed registers:
//     with the zeroing, ptxas serialised every MMA of the plain-store instantiations (C7515).
//
// Clusters (FLASHDELTA_MOE_GEMM=sm90-2cta / sm90-4cta; off by default: on the H100 they measured
// slower than single blocks, first 30-34% of the matmul rate against 35-47% with cluster-scope
// releases of the remote stages, then, with CTA-scope ones (session 8), 5-10% (2) and 8-20% (4)
// slower per GEMM; the wide kernel in 2-block clusters, on branch wide-2cta, 3-8%). At 128 x 128
// tiles a block reads 32 KiB per 64-deep k-step from L2 for 2 MFLOP of MMAs; summed over the
// GPU that is ~5-7 TB/s of L2-to-SM traffic at the measured 33-54% of the MMA rate (by count,
// each GEMM's tiles x k-steps x 32 KiB over its time), about what H100's L2 delivers, while
// DRAM ran at ~2 TB/s: the GEMMs look bound by L2 bandwidth, not by DRAM or the tensor cores.
// C consecutive blocks along x (C = 2 or 4, where the grouping dimension's tile count allows) form a cluster
// and share one operand: kRows groups column tiles of the same rows (same A boxes), kReduction
// m-tiles of the same expert and columns (same B boxes). CTA i < 2 loads box i of the shared
// operand once, multicast into every block's shared memory (each block's full barrier counts
// the bytes that land in it, whoever issued them): per k-step a pair reads 48 KiB instead of
// 64, a quad 80 instead of 128. A producer overwrites its peers' stages too, so every consumer
// warp releases a stage on every block's empty barrier (the count is 4 x the cluster's active
// warpgroups); the barriers are initialised before a cluster barrier, and every thread meets
// the cluster again before exiting (a block must not exit while a peer may still arrive on its
// barriers). The results are bitwise those of single blocks (same MMAs in the same order).
// Every box has 128-byte rows (64 two-byte elements), is 1024-byte aligned and is written by TMA
// with the 128-byte swizzle, which is the canonical layout wgmma reads through a matrix
// descriptor (start address, LBO, SBO, swizzle mode):
//   K-major operand (rows of 64 k):   8-row core groups 1024 B apart (SBO); the k16 step j
//                                      starts 32 j bytes into the row (the hardware applies the
//                                      swizzle to the final address); 128 rows of B = two boxes
//                                      back to back = one descriptor.
//   MN-major operand (rows of 64 m/n, one row per k; "transposed" for wgmma): 8-k core groups
//                                      1024 B apart (SBO), the next 64 columns one box (8 KiB)
//                                      further (LBO); the k16 step j starts at 2048 j bytes.
// Operands by GEMM: forward (x W1^T, act W2^T): A and B K-major; input gradients (d_out W2,
// d_gate_up W1): A K-major, B N-major (the weights as stored); weight gradients (d_out_e^T act_e,
// d_gate_up_e^T x_e): A M-major, B N-major, k = the expert's rows.
//
// Bounds. TMA zero-fills what lies outside the tensor (k past K, rows past N, columns past n);
// a B box wholly past n is not loaded at all (only unstored columns would read it).
// kRows: the A rows of a tile past the expert's end are other experts' rows; they only feed
// output rows that are never stored. The SwiGLU tile loads 64 gate rows j0.. and the 64 matching
// up rows I + j0.. of gate_up_proj (the interleave of the sm_80 kernel, as two boxes). kReduction:
// k runs over the expert's rows, so the rows of the last k-step past the expert's end (another
// expert's data) are zeroed in shared memory by the consumers before the MMAs read them
// (generic-proxy writes, fence.proxy.async, named barrier). A warpgroup whose 64 rows all lie
// past the tile's end (an expert's last, short tile) neither loads nor multiplies.
//
// Epilogues. Every epilogue writes through shared memory, so that rows leave as 16-byte
// stores of 8 consecutive threads (whole 128-byte lines) rather than the accumulator layout's
// 4-byte column pairs 8 rows apart: "staged blocks" of 64 rows x 64 columns in the 128-byte
// swizzled layout of a TMA box (tma_swizzle_offset, store_staged_block; the wide kernel uses
// them too).
//   plain store: the warpgroup's own A boxes of stages 0 and 1 (free once its MMAs are done);
//   SwiGLU forward: gate, up and act blocks in boxes 0-2 of stage `group` (the ring is free once
//     both warpgroups' MMAs are done), the arithmetic of store_swiglu_pair (swiglu_pairs);
//   SwiGLU backward (reads gate_up, writes d_gate_up and act): the gate_up tile is loaded by
//     TMA into the ring as two more producer steps after the last k-step, so it lands while the
//     last MMAs run instead of being read from global memory after them. Each thread reads the
//     gate / up pairs at its accumulator positions (the TMA box layout is conflict-free for
//     them) and writes d_gate / d_up back over the same bytes, act into the third stage; then
//     the blocks are stored. (Earlier versions read gate_up with 4-byte loads from the
//     registers' layout, then 16-byte loads two steps ahead after an L2 prefetch: the loads'
//     round trips sat between the MMAs and the stores.)
//
// Scheduling, determinism, no host synchronisation: as the sm_80 kernel (same grid, same block
// scan over the device offsets, one block per output tile, no atomics; both blocks of a cluster
// have the same blockIdx.y / z, so they find the same expert and rows, or exit together). Two
// blocks per SM (2 x 97 KiB of shared memory, <= 96 registers a thread: 18 warps put 5 on an
// SM sub-partition) so that one block's epilogue overlaps the other's main loop. A barrier wait that never completes traps instead of hanging.
//
// Assumes: sm_90a (the body compiles to a trap elsewhere; the host dispatches here only after
// checking the device and the loaded binary); bf16 or fp16; operands TMA-compatible (16-byte
// aligned bases, leading dimensions and expert strides: vector_ok).
#pragma once

#include <cuda.h>  // CUtensorMap (type only)

#include <cstdint>

#include "cuda/moe_grouped_gemm.cuh"
#include "cuda/sm90a_ready.cuh"
#include "cuda/tensor_map.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace flashdelta::detail::cuda::moe::sm90 {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kBox = 64;                        // every TMA box: 64 x 64 elements
constexpr int kBoxBytes = kBox * kBox * 2;      // 8 KiB: 64 rows of 128 bytes
constexpr int kStages = 3;
constexpr int kStageBytes = 4 * kBoxBytes;      // A box per warpgroup, two B boxes
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align the ring to 1 KiB
constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // + the producer warp
constexpr int kProducerWarp = kConsumerWarps;

// ---- PTX wrappers (sm_90a only)

// Named barrier `id` over `threads` threads (0 is __syncthreads; immediate ids keep ptxas from
// reserving them all).
template <int kId, int kCount>
__device__ __forceinline__ void named_barrier() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
}

// The 128 threads of consumer warpgroup `group` only (named barriers 2 and 3; 1 is both
// consumer warpgroups').
__device__ __forceinline__ void warpgroup_barrier(int group) {
  if (group == 0) {
    named_barrier<2, 128>();
  } else {
    named_barrier<3, 128>();
  }
}

// The mbarrier wrappers, the 2D TMA load and shared addresses are the library's (tma.cuh).
using cuda::mbarrier_arrive;
using cuda::mbarrier_arrive_expect_tx;
using cuda::fence_mbarrier_init;
using cuda::fence_proxy_async;
using cuda::mbarrier_init;
using cuda::mbarrier_wait;
using cuda::shared_address;
using cuda::tma_load_2d;
using cuda::tma_swizzle_offset;
// The descriptor and wgmma fences are the library's too (wgmma.cuh).
using cuda::fence_accumulators;
using cuda::smem_descriptor;
using cuda::wgmma_commit;
using cuda::wgmma_fence;
using cuda::wgmma_wait;

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// TMA stores: a box of shared memory at `src` to the tensor at the given coordinates (what lies
// outside the tensor is not written), tracked by this thread's bulk groups. The writes of the
// box by other threads must be made visible to the async proxy first (fence_proxy_async by
// each writer, then a barrier).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int32_t c0,
                                             int32_t c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::
                   "l"(reinterpret_cast<uint64_t>(map)), "r"(src), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t src, int32_t c0,
                                             int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void bulk_commit_group() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Returns once at most kPending of this thread's committed bulk groups (the newest) have not
// yet read their shared memory (the global writes may still be in flight: the sources of the
// others may be rewritten).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Returns once every committed bulk group of this thread is complete (writes performed).
__device__ __forceinline__ void bulk_wait_group_all() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// ---- clusters (TMA multicast of the operand every block of a cluster reads)

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// Every non-exited thread of the cluster: release what this thread did before the arrive,
// acquire what the others did before theirs.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
}

// The mbarrier at the same offset in CTA `rank`'s shared memory, arrived on from this CTA, with
// the default semantics (release at CTA scope). What a consumer's arrive must order is its reads
// of the stage, complete by wgmma.wait_group before it. A release at cluster scope
// (`.release.cluster`) measured 1.5x the wide kernel's time in 2-block clusters (2026-11-24,
// session 8), and was what the clusters of this kernel ran with when session 3 measured them.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint32_t bar, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote)
               : "memory");
}

// As tma_load_2d / tma_load_3d, but the box lands at offset `dst` of the shared memory of
// every CTA in `cta_mask`, each signalling its own mbarrier at offset `bar`.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map,
                                                      uint32_t bar, int32_t c0, int32_t c1,
                                                      uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "h"(cta_mask)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const CUtensorMap* map,
                                                      uint32_t bar, int32_t c0, int32_t c1,
                                                      int32_t c2, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
      : "memory");
}


#define FLASHDELTA_WGMMA_D_OPERANDS                                                             \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),           \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),   \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),             \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),             \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),             \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),             \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),             \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),             \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),             \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),             \
      "+f"(d[62]), "+f"(d[63])

#define FLASHDELTA_WGMMA_M64N128K16(TYPES)                                                     \
  "{\n"                                                                                        \
  ".reg .pred accumulate;\n"                                                                   \
  "setp.ne.b32 accumulate, %68, 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPES                                         \
  " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18,"     \
  " %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36," \
  " %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54," \
  " %55, %56, %57, %58, %59, %60, %61, %62, %63},"                                             \
  " %64, %65, accumulate, 1, 1, %66, %67;\n"                                                   \
  "}\n"

// D[64 x 128] += A[64 x 16] B[16 x 128], both from shared memory (descriptors); kTransA /
// kTransB: the operand is MN-major. accumulate = 0 (the scale-d predicate) makes it D = A B,
// ignoring D's previous contents: the first MMA of a tile.
template <typename T, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a,
                                                 uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(FLASHDELTA_WGMMA_M64N128K16("bf16.bf16")
                 : FLASHDELTA_WGMMA_D_OPERANDS
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA ? 1 : 0), "n"(kTransB ? 1 : 0), "r"(accumulate));
  } else {
    asm volatile(FLASHDELTA_WGMMA_M64N128K16("f16.f16")
                 : FLASHDELTA_WGMMA_D_OPERANDS
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA ? 1 : 0), "n"(kTransB ? 1 : 0), "r"(accumulate));
  }
}

#undef FLASHDELTA_WGMMA_M64N128K16
#undef FLASHDELTA_WGMMA_D_OPERANDS

// ---- staged epilogue blocks (shared with the wide kernel)
//
// A block is 64 rows of kRowBytes (128: 64 columns; 64: 32 columns) of the storage dtype in
// shared memory, in the layout TMA uses with the kRowBytes-byte swizzle (a box at an address
// aligned to 8 rows), addressed by tma_swizzle_offset (tma.cuh).

// Shared-memory accesses by 32-bit shared-window address: a block's per-thread addresses are
// loop invariants that ptxas may hoist out of the persistent tile loop, and a 64-bit generic
// pointer would hold two registers for each.
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// Writes the block staged at `block` to base[(row0 + r) * ld + col0 + c] for rows
// row0 + r < row_limit and columns col0 + c < col_limit: each row as 16-byte stores of
// consecutive threads of the warpgroup (kRowBytes contiguous bytes) where `vector` allows (base,
// ld and col0 keep the chunks 16-byte aligned), else element by element. The caller
// synchronises the warpgroup before (the block is written) and after (it is rewritten).
template <int kRowBytes = 128, typename T>
__device__ __forceinline__ void store_staged_block(const uint8_t* block, int thread_in_group,
                                                   T* base, int64_t ld, int64_t row0,
                                                   int64_t row_limit, int64_t col0,
                                                   int64_t col_limit, bool vector) {
  constexpr int kChunks = kRowBytes / 16;  // of 8 columns, a row
#pragma unroll
  for (int step = 0; step < 64 * kChunks / 128; ++step) {
    const int q = thread_in_group + 128 * step;
    const int row = q / kChunks, chunk = q % kChunks;
    const uint4 v =
        ld_shared_v4(shared_address(block) + tma_swizzle_offset<kRowBytes>(row, 8 * chunk));
    const int64_t m = row0 + row;
    const int64_t n = col0 + chunk * 8;
    if (m >= row_limit || n >= col_limit) continue;
    T* dst = base + m * ld + n;
    if (vector && n + 8 <= col_limit) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {  // element by element: the 16 bytes as four pairs
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        StorePair<T> pair;
        memcpy(&pair, &words[w], sizeof(pair));
        if (n + 2 * w < col_limit) dst[2 * w] = pair.x;
        if (n + 2 * w + 1 < col_limit) dst[2 * w + 1] = pair.y;
      }
    }
  }
}

// The SwiGLU forward's three values of the column pair (gate0, up0), (gate1, up1), as
// store_swiglu_pair computes them: g and u rounded to the storage dtype, act from the rounded
// values.
template <typename T>
struct SwiGLUPairs {
  StorePair<T> gate, up, act;
};
template <typename T>
__device__ __forceinline__ SwiGLUPairs<T> swiglu_pairs(float gate0, float up0, float gate1,
                                                       float up1) {
  const float g0 = round_f32<T>(gate0), g1 = round_f32<T>(gate1);
  const float u0 = round_f32<T>(up0), u1 = round_f32<T>(up1);
  return {StorePair<T>{from_f32<T>(g0), from_f32<T>(g1)},
          StorePair<T>{from_f32<T>(u0), from_f32<T>(u1)},
          StorePair<T>{from_f32<T>(g0 / (1.0f + __expf(-g0)) * u0),
                       from_f32<T>(g1 / (1.0f + __expf(-g1)) * u1)}};
}

// ---- the kernel

template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, 2)
grouped_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a,
                         const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_gate_up,
                         const GroupedGemmParams<T> p, const int cluster_size) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kReduction = kGrouping == Grouping::kReduction;
  constexpr bool kATrans = kReduction;    // A M-major (weight gradients)
  constexpr bool kBTrans = !kBKContig;    // B N-major (weights as stored, or row matrices)
  static_assert(!kReduction || !kBKContig, "weight-gradient GEMMs read both operands along m / n");
  static_assert(kEpilogue != Epilogue::kSwiGLU || kBKContig, "the SwiGLU GEMM reads W1 K-major");

  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ __align__(8) uint64_t empty_bar[kStages];
  // The ring starts at the first 1024-byte boundary of the dynamic allocation (the swizzle
  // pattern is a function of the address bits 4-9).
  const uint32_t ring = (shared_address(smem_raw) + 1023u) & ~1023u;
  uint8_t* const ring_ptr = smem_raw + (ring - shared_address(smem_raw));

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  if (threadIdx.x == kProducerWarp * 32) {  // fetch the descriptors while the block schedules
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_a)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_b)) : "memory");
    if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tmap_gate_up))
                   : "memory");
    }
  }

  // ---- which expert and which tile (the sm_80 kernel's scheduling)
  int expert = 0;
  int64_t m_tile_start = 0, row_begin = 0, row_end = 0;
  const int64_t n_tile = kReduction ? blockIdx.y : blockIdx.x;
  if constexpr (!kReduction) {
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
  const int64_t m_limit = kReduction ? p.m_size : row_end;
  // Warpgroup 1 works only when the tile has rows past its first 64.
  const int active_groups = m_tile_start + kBM / 2 < m_limit ? 2 : 1;
  // A cluster of cluster_size (1, 2 or 4) blocks along x (see the note): this block is CTA
  // `rank`; its peers have the neighbouring blockIdx.x (kRows: the other column tiles of the same
  // rows; kReduction: the other m-tiles of the same expert and columns). The peers' consumers
  // release our stages too: peer_groups counts their active warpgroups.
  const bool multicast = cluster_size > 1;
  const uint32_t rank = multicast ? cluster_ctarank() : 0u;
  int peer_groups = 0;
  for (int r = 0; r < cluster_size; ++r) {
    if (r == static_cast<int>(rank)) continue;
    if constexpr (kReduction) {
      const int64_t peer_m_start = static_cast<int64_t>(blockIdx.x - rank + r) * kBM;
      peer_groups += peer_m_start + kBM / 2 < m_limit ? 2 : 1;
    } else {
      peer_groups += active_groups;  // the same rows
    }
  }
  const auto cluster_mask = static_cast<uint16_t>((1u << cluster_size) - 1u);
  const int64_t k_extent = kReduction ? row_end - row_begin : p.k_size;
  const int num_k_tiles = static_cast<int>((k_extent + kBK - 1) / kBK);
  const int64_t n_tile_start = kEpilogue == Epilogue::kSwiGLU ? n_tile * (kBN / 2) : n_tile * kBN;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(shared_address(&full_bar[s]), 1);  // the producer's arrive (+ the TMA bytes)
      // One arrive per consumer warp of this block and of its peers.
      mbarrier_init(shared_address(&empty_bar[s]), 4 * (active_groups + peer_groups));
    }
    // Make the initialised barriers visible to the async proxy (TMA), the other threads and
    // the peer block.
    fence_mbarrier_init();
  }
  // The last block-wide barrier: producer and consumers part ways below. In a cluster, also
  // the point after which the peers may multicast into this block and arrive on its barriers.
  if (multicast) {
    cluster_arrive();
    cluster_wait();
  } else {
    __syncthreads();
  }

  if (warp == kProducerWarp) {
    if (lane == 0) {
      // The second B box is skipped when it lies wholly past n (a last column tile of <= 64):
      // its accumulator columns are never stored, so stale shared memory there is harmless.
      const int b_boxes =
          kEpilogue == Epilogue::kSwiGLU || n_tile_start + kBox < p.n_size ? 2 : 1;
      const uint32_t stage_bytes = static_cast<uint32_t>((active_groups + b_boxes) * kBoxBytes);
      for (int kt = 0; kt < num_k_tiles; ++kt) {
        const int s = kt % kStages;
        if (kt >= kStages) mbarrier_wait(shared_address(&empty_bar[s]), ((kt / kStages) - 1) & 1);
        const uint32_t bar = shared_address(&full_bar[s]);
        mbarrier_arrive_expect_tx(bar, stage_bytes);
        const uint32_t sa = ring + static_cast<uint32_t>(s * kStageBytes);
        const uint32_t sb = sa + 2 * kBoxBytes;
        const int32_t k0 = kt * kBK;
        const auto e = static_cast<int32_t>(expert);
        // Coordinates are innermost first; they fit in int32 (N < 2^31 rows, extents < 2^31).
        // In a cluster, the shared operand's box i is loaded by CTA i for all (kRows: the A
        // boxes; kReduction: the B boxes); the byte count armed above is the same either way.
        for (int g = 0; g < active_groups; ++g) {
          const uint32_t dst = sa + static_cast<uint32_t>(g * kBoxBytes);
          if constexpr (kReduction) {  // A = [rows][m]: box (64 m) x (64 rows of the expert)
            tma_load_2d(dst, &tmap_a, bar, static_cast<int32_t>(m_tile_start + g * kBox),
                        static_cast<int32_t>(row_begin + k0));
          } else if (multicast) {  // A = [rows][k], shared with the peers
            if (g == static_cast<int>(rank)) {
              tma_load_2d_multicast(dst, &tmap_a, bar, k0,
                                    static_cast<int32_t>(m_tile_start + g * kBox), cluster_mask);
            }
          } else {  // A = [rows][k]
            tma_load_2d(dst, &tmap_a, bar, k0, static_cast<int32_t>(m_tile_start + g * kBox));
          }
        }
        for (int h = 0; h < b_boxes; ++h) {
          const uint32_t dst = sb + static_cast<uint32_t>(h * kBoxBytes);
          if constexpr (kReduction) {  // B = [rows][n], shared with the peers in a cluster
            const auto n0 = static_cast<int32_t>(n_tile_start + h * kBox);
            const auto r0 = static_cast<int32_t>(row_begin + k0);
            if (!multicast) {
              tma_load_2d(dst, &tmap_b, bar, n0, r0);
            } else if (h == static_cast<int>(rank)) {
              tma_load_2d_multicast(dst, &tmap_b, bar, n0, r0, cluster_mask);
            }
          } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {  // gate rows, then up rows
            const int64_t row = n_tile_start + (h == 0 ? 0 : p.intermediate);
            tma_load_3d(dst, &tmap_b, bar, k0, static_cast<int32_t>(row), e);
          } else if constexpr (kBKContig) {  // B = [E][n][k]
            tma_load_3d(dst, &tmap_b, bar, k0, static_cast<int32_t>(n_tile_start + h * kBox), e);
          } else {  // B = [E][k][n]
            tma_load_3d(dst, &tmap_b, bar, static_cast<int32_t>(n_tile_start + h * kBox), k0, e);
          }
        }
      }
      if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
        // Two more ring steps, num_k_tiles and num_k_tiles + 1: the epilogue's gate_up tile,
        // column half h = 0, 1 (d_act columns n_tile_start + 64 h ..), boxes [gate rows 0-63,
        // gate rows 64-127, up rows 0-63, up rows 64-127] of the active warpgroups. They land
        // while the last k-steps' MMAs run (each stage is loaded as soon as the consumers
        // release it), so the epilogue reads gate and up from shared memory instead of
        // waiting on global loads. Rows past the expert's end only feed unstored rows; a half
        // wholly past n loads nothing (its barrier completes on the arrive alone).
        for (int h = 0; h < 2; ++h) {
          const int kt = num_k_tiles + h;
          const int s = kt % kStages;
          if (kt >= kStages) mbarrier_wait(shared_address(&empty_bar[s]), ((kt / kStages) - 1) & 1);
          const uint32_t bar = shared_address(&full_bar[s]);
          const int64_t n0 = n_tile_start + h * kBox;
          const bool load = n0 < p.n_size;
          mbarrier_arrive_expect_tx(bar, load ? static_cast<uint32_t>(2 * active_groups * kBoxBytes) : 0u);
          if (!load) continue;
          const uint32_t stage = ring + static_cast<uint32_t>(s * kStageBytes);
          for (int g = 0; g < active_groups; ++g) {
            const auto m0 = static_cast<int32_t>(m_tile_start + g * kBox);
            tma_load_2d(stage + static_cast<uint32_t>(g * kBoxBytes), &tmap_gate_up, bar,
                        static_cast<int32_t>(n0), m0);
            tma_load_2d(stage + static_cast<uint32_t>((2 + g) * kBoxBytes), &tmap_gate_up, bar,
                        static_cast<int32_t>(p.intermediate + n0), m0);
          }
        }
      }
    }
    __syncwarp();  // lanes 1-31 wait here for lane 0's loop: the warp meets the cluster together
    if (multicast) {  // every thread of the cluster arrives once; all wait at the very end
      cluster_arrive();
      cluster_wait();
    }
    return;
  }

  const int group = warp / 4;  // consumer warpgroup: output rows [64 group, 64 group + 64)
  if (group >= active_groups) {
    if (multicast) {
      cluster_arrive();
      cluster_wait();
    }
    return;
  }
  const int consumer_threads = 128 * active_groups;

  // No zero-initialisation: the first MMA overwrites (scale-d = 0). Accumulator registers
  // written by ordinary instructions around the MMAs made ptxas serialise every wgmma of the
  // plain-store instantiations (warning C7515: one MMA in flight instead of a k-step's four).
  float acc[64];

  for (int kt = 0; kt < num_k_tiles; ++kt) {
    const int s = kt % kStages;
    mbarrier_wait(shared_address(&full_bar[s]), (kt / kStages) & 1);
    const uint32_t sa = ring + static_cast<uint32_t>(s * kStageBytes);
    const uint32_t sb = sa + 2 * kBoxBytes;
    if constexpr (kReduction) {
      const int64_t valid = k_extent - static_cast<int64_t>(kt) * kBK;  // rows of this k-step
      if (valid < kBK) {
        // Zero the rows [valid, 64) of every loaded box: the next expert's rows (rows past N
        // are already zero). A row is one k, 128 bytes: the swizzle permutes 16-byte chunks
        // within a row, so a whole row is zeroed whatever the pattern.
        const int first = static_cast<int>(valid);
        const int chunks_per_box = (kBox - first) * 8;  // 16-byte chunks
        const int boxes = active_groups + 2;
        uint8_t* const stage_ptr = ring_ptr + s * kStageBytes;
        for (int c = static_cast<int>(threadIdx.x); c < boxes * chunks_per_box; c += consumer_threads) {
          const int box = c / chunks_per_box;
          const int slot = box < active_groups ? box : 2 + (box - active_groups);
          const int within = c % chunks_per_box;
          *reinterpret_cast<uint4*>(stage_ptr + slot * kBoxBytes + first * 128 + within * 16) =
              make_uint4(0u, 0u, 0u, 0u);
        }
        // Generic-proxy writes, then wgmma (async proxy) reads: fence, then meet the other
        // consumers (named barrier 1; barrier 0 is __syncthreads).
        fence_proxy_async();
        asm volatile("bar.sync 1, %0;\n" ::"r"(consumer_threads) : "memory");
      }
    }
    fence_accumulators(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint32_t a_box = sa + static_cast<uint32_t>(group * kBoxBytes);
      const uint64_t desc_a = kATrans ? smem_descriptor(a_box + kk * 2048, kBoxBytes, 1024)
                                      : smem_descriptor(a_box + kk * 32, 16, 1024);
      const uint64_t desc_b = kBTrans ? smem_descriptor(sb + kk * 2048, kBoxBytes, 1024)
                                      : smem_descriptor(sb + kk * 32, 16, 1024);
      wgmma_m64n128k16<T, kATrans, kBTrans>(acc, desc_a, desc_b, kt > 0 || kk > 0);
    }
    wgmma_commit();
    fence_accumulators(acc);
    // Keep this k-step's MMAs in flight; the previous step's have completed: release its stage.
    wgmma_wait<1>();
    fence_accumulators(acc);
    if (kt > 0 && lane == 0) {
      const uint32_t empty = shared_address(&empty_bar[(kt - 1) % kStages]);
      mbarrier_arrive(empty);
      for (int r = 0; r < cluster_size; ++r) {
        if (r != static_cast<int>(rank)) mbarrier_arrive_cluster(empty, static_cast<uint32_t>(r));
      }
    }
  }
  wgmma_wait<0>();
  fence_accumulators(acc);
  if (num_k_tiles == 0) {  // kReduction, an expert without rows: its gradient is zero
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  }
  // This warpgroup's last remote operation is behind it: the peers may leave once the rest of
  // the cluster is done too (the wait is at the end, after the epilogue).
  if (multicast) cluster_arrive();

  // ---- epilogue. Thread holds acc[4 j + 2 i + c] for
  //   row  64 group + 16 (warp % 4) + lane / 4 + 8 i,  column  8 j + 2 (lane % 4) + c
  if constexpr (kEpilogue == Epilogue::kStore) {
    T* c_base = p.c;
    if constexpr (kReduction) c_base += static_cast<int64_t>(expert) * p.c_expert_stride;
    // Through shared memory, so that each row leaves as 16-byte stores of 16 consecutive
    // threads (256 contiguous bytes) rather than 4-byte pieces of 8 rows. The warpgroup's
    // 64 x 128 tile goes to its own A boxes of stages 0 and 1 (columns 0-63, 64-127): only this
    // warpgroup's MMAs read them, and they are complete; every TMA load has landed. Rows of 128
    // bytes with the 16-byte chunks XOR-swizzled by row % 8: conflict-free writes and reads.
    uint8_t* const tile = ring_ptr + group * kBoxBytes;  // + kStageBytes: columns 64-127
    static_assert(kStages >= 2, "the epilogue stages its tile in two stages' A boxes");
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = (warp % 4) * 16 + lane / 4 + i * 8;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        uint8_t* const dst = tile + (j / 8) * kStageBytes + row * 128 +
                             (((j % 8) ^ (row % 8)) * 16) + (lane % 4) * 4;
        *reinterpret_cast<StorePair<T>*>(dst) =
            StorePair<T>{from_f32<T>(acc[4 * j + 2 * i]), from_f32<T>(acc[4 * j + 2 * i + 1])};
      }
    }
    warpgroup_barrier(group);
    const int thread_in_group = static_cast<int>(threadIdx.x) % 128;
#pragma unroll
    for (int it = 0; it < 8; ++it) {  // 64 rows x 16 chunks of 8 columns, 8 per thread
      const int q = thread_in_group + 128 * it;
      const int row = q / 16, chunk = q % 16;
      const uint4 v = *reinterpret_cast<const uint4*>(
          tile + (chunk / 8) * kStageBytes + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
      const int64_t m = m_tile_start + group * 64 + row;
      const int64_t n = n_tile_start + chunk * 8;
      if (m >= m_limit || n >= p.n_size) continue;
      T* dst = c_base + m * p.ldc + n;
      if (p.vector_store_ok && n + 8 <= p.n_size) {
        *reinterpret_cast<uint4*>(dst) = v;
      } else {  // element by element: the 16 bytes as four pairs
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          StorePair<T> pair;
          memcpy(&pair, &words[w], sizeof(pair));
          if (n + 2 * w < p.n_size) dst[2 * w] = pair.x;
          if (n + 2 * w + 1 < p.n_size) dst[2 * w + 1] = pair.y;
        }
      }
    }
  } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {
    // Accumulator columns 0-63: gate j0 + c; 64-127: up j0 + c. Once both warpgroups' MMAs are
    // done the ring is free (every load has landed): warpgroup g stages its gate, up and act
    // blocks (64 rows x 64 columns) in boxes 0-2 of stage g, then each row leaves as 16-byte
    // stores (rather than the accumulator layout's 4-byte pairs, 8 rows apart).
    asm volatile("bar.sync 1, %0;\n" ::"r"(consumer_threads) : "memory");
    uint8_t* const blocks = ring_ptr + group * kStageBytes;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = (warp % 4) * 16 + lane / 4 + i * 8;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const SwiGLUPairs<T> v =
            swiglu_pairs<T>(acc[4 * j + 2 * i], acc[4 * (j + 8) + 2 * i],
                            acc[4 * j + 2 * i + 1], acc[4 * (j + 8) + 2 * i + 1]);
        const int offset = tma_swizzle_offset(row, 8 * j + 2 * (lane % 4));
        *reinterpret_cast<StorePair<T>*>(blocks + offset) = v.gate;
        *reinterpret_cast<StorePair<T>*>(blocks + kBoxBytes + offset) = v.up;
        *reinterpret_cast<StorePair<T>*>(blocks + 2 * kBoxBytes + offset) = v.act;
      }
    }
    warpgroup_barrier(group);
    const int thread_in_group = static_cast<int>(threadIdx.x) % 128;
    const int64_t row0 = m_tile_start + group * 64;
    store_staged_block(blocks, thread_in_group, p.gate_up, p.ld_gate_up, row0, m_limit,
                       n_tile_start, p.intermediate, p.vector_store_ok);
    store_staged_block(blocks + kBoxBytes, thread_in_group, p.gate_up + p.intermediate,
                       p.ld_gate_up, row0, m_limit, n_tile_start, p.intermediate,
                       p.vector_store_ok);
    store_staged_block(blocks + 2 * kBoxBytes, thread_in_group, p.act, p.ld_act, row0, m_limit,
                       n_tile_start, p.intermediate, p.vector_store_ok);
  } else {  // kSwiGLUBackward, acc = d_act
    // The gate_up tile is in the ring (the producer's steps num_k_tiles + h, see above): column
    // half h in stage S_h = (num_k_tiles + h) % 3, this warpgroup's gate rows in box `group`,
    // its up rows in box 2 + group, in the layout of a staged block. Each thread reads the gate
    // and up pairs of its accumulator positions (conflict-free: see tma_swizzle_offset) and
    // writes d_gate and d_up back over exactly the bytes it read (no other thread touches them:
    // no barrier between the reads and the writes), and act into box 2 h + group of the third
    // stage F = (num_k_tiles + 2) % 3, which held the last k-step's operands: free once both
    // warpgroups' MMAs are done. Both halves are computed before any block is stored, so the
    // accumulators are dead by then (at the 96-register bound, storing half 0 while half 1's
    // accumulators were live spilled). Then the blocks leave as 16-byte row stores.
    asm volatile("bar.sync 1, %0;\n" ::"r"(consumer_threads) : "memory");
    const auto half_blocks = [&](int h, int which) {  // which: 0 gate / d_gate, 1 up / d_up, 2 act
      const int kt = num_k_tiles + h;
      if (which == 2) {
        return ring_ptr + ((num_k_tiles + 2) % kStages) * kStageBytes + (2 * h + group) * kBoxBytes;
      }
      return ring_ptr + (kt % kStages) * kStageBytes + (2 * which + group) * kBoxBytes;
    };
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (n_tile_start + h * kBox >= p.n_size) break;  // uniform: nothing loaded for this half
      const int kt = num_k_tiles + h;
      mbarrier_wait(shared_address(&full_bar[kt % kStages]), (kt / kStages) & 1);
      uint8_t* const gate_block = half_blocks(h, 0);
      uint8_t* const up_block = half_blocks(h, 1);
      uint8_t* const act_block = half_blocks(h, 2);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = (warp % 4) * 16 + lane / 4 + i * 8;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int j = 8 * h + jj;
          const int offset = tma_swizzle_offset(row, 8 * jj + 2 * (lane % 4));
          const StorePair<T> g = *reinterpret_cast<const StorePair<T>*>(gate_block + offset);
          const StorePair<T> u = *reinterpret_cast<const StorePair<T>*>(up_block + offset);
          StorePair<T> d_g, d_u, a;
          swiglu_backward_values<T>(acc[4 * j + 2 * i], g.x, u.x, d_g.x, d_u.x, a.x);
          swiglu_backward_values<T>(acc[4 * j + 2 * i + 1], g.y, u.y, d_g.y, d_u.y, a.y);
          *reinterpret_cast<StorePair<T>*>(gate_block + offset) = d_g;
          *reinterpret_cast<StorePair<T>*>(up_block + offset) = d_u;
          if (p.act != nullptr) *reinterpret_cast<StorePair<T>*>(act_block + offset) = a;
        }
      }
    }
    warpgroup_barrier(group);
    const int thread_in_group = static_cast<int>(threadIdx.x) % 128;
    const int64_t row0 = m_tile_start + group * 64;
#pragma unroll 1
    for (int h = 0; h < 2; ++h) {
      const int64_t n0 = n_tile_start + h * kBox;
      if (n0 >= p.n_size) break;
      store_staged_block(half_blocks(h, 0), thread_in_group, p.d_gate_up, p.ld_gate_up, row0,
                         m_limit, n0, p.n_size, p.vector_store_ok);
      store_staged_block(half_blocks(h, 1), thread_in_group, p.d_gate_up + p.intermediate,
                         p.ld_gate_up, row0, m_limit, n0, p.n_size, p.vector_store_ok);
      if (p.act != nullptr) {
        store_staged_block(half_blocks(h, 2), thread_in_group, p.act, p.ld_act, row0, m_limit, n0,
                           p.n_size, p.vector_store_ok);
      }
    }
  }
  if (multicast) cluster_wait();
#else
  __trap();  // never launched: the host checks for the sm_90a binary first
#endif
}

// ---- host side

// The tensor maps of one GEMM (see the kernel's producer for the coordinates). False when a
// map cannot be encoded: the caller takes the sm_80 path.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool make_tensor_maps(const GroupedGemmParams<T>& p, CUtensorMap* map_a, CUtensorMap* map_b) {
  const DType dtype = std::is_same_v<T, __nv_bfloat16> ? DType::kBFloat16 : DType::kFloat16;
  const uint32_t box[3] = {kBox, kBox, 1};
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  if constexpr (kGrouping == Grouping::kReduction) {
    const uint64_t a_dims[2] = {u(p.m_size), u(p.num_rows)};
    const uint64_t a_strides[1] = {u(p.lda) * 2};
    const uint64_t b_dims[2] = {u(p.n_size), u(p.num_rows)};
    const uint64_t b_strides[1] = {u(p.ldb) * 2};
    return encode_tensor_map_2byte(map_a, dtype, p.a, 2, a_dims, a_strides, box) &&
           encode_tensor_map_2byte(map_b, dtype, p.b, 2, b_dims, b_strides, box);
  } else {
    const uint64_t a_dims[2] = {u(p.k_size), u(p.num_rows)};
    const uint64_t a_strides[1] = {u(p.lda) * 2};
    if (!encode_tensor_map_2byte(map_a, dtype, p.a, 2, a_dims, a_strides, box)) return false;
    const uint64_t b_strides[2] = {u(p.ldb) * 2, u(p.b_expert_stride) * 2};
    if constexpr (kBKContig) {  // [E][n rows][k]; the SwiGLU GEMM's rows are gate and up
      const int64_t rows = kEpilogue == Epilogue::kSwiGLU ? 2 * p.intermediate : p.n_size;
      const uint64_t b_dims[3] = {u(p.k_size), u(rows), u(p.num_experts)};
      return encode_tensor_map_2byte(map_b, dtype, p.b, 3, b_dims, b_strides, box);
    } else {  // [E][k][n]
      const uint64_t b_dims[3] = {u(p.n_size), u(p.k_size), u(p.num_experts)};
      return encode_tensor_map_2byte(map_b, dtype, p.b, 3, b_dims, b_strides, box);
    }
  }
}

// Whether this instantiation's sm_90a code is what the current device runs
// (sm90a_kernel_ready); also opts in to the shared memory and the carve-out for two blocks per
// SM.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool sm90_kernel_ready() {
  return sm90a_kernel_ready<grouped_gemm_sm90_kernel<T, kGrouping, kBKContig, kEpilogue>>(
      [](const cudaFuncAttributes&, int) {
        auto* kernel = grouped_gemm_sm90_kernel<T, kGrouping, kBKContig, kEpilogue>;
        FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
        FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
            cudaSharedmemCarveoutMaxShared));
        return true;
      });
}

// p with the epilogue's access flags set from its pointers and strides: vector_store_ok
// (16-byte stores of the plain epilogue and of the wide kernel's SwiGLU forward; 16-byte
// accesses of the SwiGLU backward) and
// pair_store_ok (the SwiGLU epilogues' column pairs, also at column I + j). Shared with the
// wide kernel (moe_grouped_gemm_sm90_wide.cuh).
template <Epilogue kEpilogue, typename T>
GroupedGemmParams<T> with_epilogue_flags(const GroupedGemmParams<T>& p) {
  GroupedGemmParams<T> q = p;
  const auto pair_aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % (2 * sizeof(T)) == 0;
  };
  if constexpr (kEpilogue == Epilogue::kStore) {
    q.vector_store_ok = reinterpret_cast<uintptr_t>(p.c) % 16 == 0 && p.ldc % 8 == 0 &&
                        p.c_expert_stride % 8 == 0;
  } else {  // gate_up / d_gate_up / act accessed two columns at a time (also at column I + j)
    q.pair_store_ok = pair_aligned(p.gate_up) && p.ld_gate_up % 2 == 0 && p.intermediate % 2 == 0 &&
                      (p.d_gate_up == nullptr || pair_aligned(p.d_gate_up)) &&
                      (p.act == nullptr || (pair_aligned(p.act) && p.ld_act % 2 == 0));
    // 8-column (16-byte) accesses: the SwiGLU backward's (gate_up read, d_gate_up and act
    // written) and the wide kernel's SwiGLU forward (gate_up and act written).
    const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    const bool gate_up_ok = aligned16(p.gate_up) && p.ld_gate_up % 8 == 0 && p.intermediate % 8 == 0;
    const bool act_ok = p.act == nullptr || (aligned16(p.act) && p.ld_act % 8 == 0);
    if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
      q.vector_store_ok = gate_up_ok && act_ok && p.d_gate_up != nullptr && aligned16(p.d_gate_up);
    } else {
      q.vector_store_ok = gate_up_ok && act_ok && p.act != nullptr;
    }
  }
  return q;
}

// Launches one grouped GEMM on the Hopper path; false (nothing launched) when it does not
// apply: operands not TMA-compatible, or this build has no sm_90a code for the device. The
// caller has checked that the device is sm_90. `max_cluster`: group the blocks in clusters of
// up to this many (1, 2 or 4) that multicast their shared operand; a cluster size must divide
// the tile count of the grouping dimension (kRows: column tiles; kReduction: m-tiles), else the
// next smaller one is used.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool try_launch_grouped_gemm_sm90(const GroupedGemmParams<T>& p, cudaStream_t stream,
                                  int max_cluster) {
  if (!p.vector_ok) return false;
  auto* kernel = grouped_gemm_sm90_kernel<T, kGrouping, kBKContig, kEpilogue>;
  if (!sm90_kernel_ready<T, kGrouping, kBKContig, kEpilogue>()) return false;
  const int64_t n_tiles = kEpilogue == Epilogue::kSwiGLU
                              ? (p.intermediate + kBN / 2 - 1) / (kBN / 2)
                              : (p.n_size + kBN - 1) / kBN;
  dim3 grid(1, 1, 1);
  if constexpr (kGrouping == Grouping::kRows) {
    const int64_t row_tiles = (p.num_rows + kBM - 1) / kBM + p.num_experts;
    if (row_tiles > 65535) return false;  // the sm_80 launcher reports the limit
    grid.x = static_cast<unsigned>(n_tiles);
    grid.y = static_cast<unsigned>(row_tiles);
  } else {
    grid.x = static_cast<unsigned>((p.m_size + kBM - 1) / kBM);
    grid.y = static_cast<unsigned>(n_tiles);
    grid.z = static_cast<unsigned>(p.num_experts);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n_tiles == 0 || p.num_rows == 0) {
    // Nothing to compute here, but the kReduction GEMM must still write zeros (experts without
    // rows): leave that to the sm_80 launcher, which handles every empty case.
    return false;
  }
  CUtensorMap map_a, map_b, map_gate_up;
  if (!make_tensor_maps<T, kGrouping, kBKContig, kEpilogue>(p, &map_a, &map_b)) return false;
  if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
    // gate_up [N][2I], read by the epilogue in 64 x 64 boxes (gate j0.., up I + j0..).
    const DType dtype = std::is_same_v<T, __nv_bfloat16> ? DType::kBFloat16 : DType::kFloat16;
    const uint32_t box[2] = {kBox, kBox};
    const uint64_t dims[2] = {static_cast<uint64_t>(2 * p.intermediate),
                              static_cast<uint64_t>(p.num_rows)};
    const uint64_t strides[1] = {static_cast<uint64_t>(p.ld_gate_up) * 2};
    if (!encode_tensor_map_2byte(&map_gate_up, dtype, p.gate_up, 2, dims, strides, box)) {
      return false;
    }
  } else {
    map_gate_up = map_a;  // unused
  }
  const GroupedGemmParams<T> q = with_epilogue_flags<kEpilogue>(p);
  int cluster_size = max_cluster >= 4 ? 4 : (max_cluster >= 2 ? 2 : 1);
  while (grid.x % cluster_size != 0) cluster_size /= 2;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = static_cast<unsigned>(cluster_size);  // consecutive blockIdx.x
  cluster[0].val.clusterDim.y = 1;
  cluster[0].val.clusterDim.z = 1;
  config.attrs = cluster;
  config.numAttrs = cluster_size > 1 ? 1 : 0;
  FLASHDELTA_CUDA_CHECK(
      cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_gate_up, q, cluster_size));
  return true;
}

}  // namespace flashdelta::detail::cuda::moe::sm90
