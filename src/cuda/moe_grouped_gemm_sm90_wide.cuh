// Hopper (sm_90a) grouped GEMM with 128 x 256 output tiles in a persistent grid: the same
// problems, groupings and epilogues as moe_grouped_gemm.cuh and moe_grouped_gemm_sm90.cuh (read
// both notes first; this one says what differs and why).
//
// Why. At 128 x 128 tiles a block pulls 32 KiB from L2 per 64-deep k-step for 2.1 MFLOP of
// MMAs (15.6 KiB / MFLOP); the 35B-A3B GEMMs ran at ~5-7 TB/s of L2-to-SM traffic, L2-bound at
// 35-47% of the matmul rate. A 128 x 256 tile reads 48 KiB per k-step for 4.2 MFLOP (11.7 KiB /
// MFLOP: 25% fewer bytes per FLOP; the B operand, mostly weights, is read once per 128 rows of
// an expert instead of once per 64-row warpgroup pair and 128 columns), and m64n256k16 reads
// 10 KiB of shared memory per 0.5 MFLOP against m64n128k16's 6 KiB per 0.26 MFLOP.
// A 128 x 256 tile needs 128 fp32 accumulators a consumer thread and a 48 KiB stage: one block
// per SM, so overlap comes from persistence instead of a second resident block: the producer runs
// ahead into the next tile's k-steps while the consumers run the epilogue of the current one,
// and no tile pays the pipeline fill (the weight-gradient GEMMs have ~4 k-steps a tile).
//
// Block: 384 threads, three warpgroups. Warpgroup 0 is the producer (setmaxnreg down to 40
// registers; one lane issues every TMA load), warpgroups 1 and 2 the consumers (setmaxnreg up to
// 232): consumer g owns output rows [64 g, 64 g + 64) of the tile and issues
// wgmma.mma_async m64n256k16 (fp32 accumulators, 128 per thread) from shared memory, one k-step
// of MMAs in flight, releasing a stage once the MMAs that read it have completed (one arrive per
// consumer warp: every stage's empty barrier counts 8, whether or not a warpgroup has rows in the
// tile; an idle warpgroup waits for the stage and releases it untouched).
//
// Shared memory (dynamic, 1024-byte aligned): a 4-stage ring of 48 KiB stages, each six 64 x 64
// TMA boxes with the 128-byte swizzle [A rows 0-63, A rows 64-127, B 0-63, B 64-127, B 128-191,
// B 192-255] (192 KiB); two epilogue staging buffers per consumer warpgroup (the ring cannot be
// borrowed: it already holds the next tile's k-steps), 8 KiB each for kReduction, 4 KiB for
// kRows (whose table leaves no room for 2 x 2 x 8 KiB); the tile table (kRows). 4 stages: a stage
// is ~1000 cycles of MMAs, so three in flight cover ~3000 cycles of L2 / DRAM latency.
// wgmma descriptors are those of the 128-wide kernel, 256 rows of B being four boxes back to back:
// K-major B (forward): 32 core groups of 8 rows, 1024 B apart (SBO), one descriptor; N-major B
// (weights as stored, row matrices): 64-column boxes 8 KiB apart (LBO), 8-k groups 1024 B (SBO).
//
// Tiles and order. kRows: the row tiles of 128 rows of every expert, concatenated, times the
// column tiles; tile t = (row tile t / n_tiles, column tile t % n_tiles): the column tiles of a
// row tile run side by side (its A rows stay in L2) and an expert's row tiles follow each other
// (its weight columns stay in L2). At kernel start the block reads all E + 1 offsets at once and
// scans them into a shared table of per-expert first row tiles and clamped row ranges (no host
// synchronisation); each role then finds a tile's expert by binary search in that table.
// kReduction: tile t = (expert, m-tile, n-tile) with n fastest; every expert has its tiles, an
// expert without rows writes zeros. Blocks take tiles blockIdx.x, + gridDim.x, ... (grid =
// min(SMs, an upper bound of the tile count); blocks past the device's tile count exit).
// Every output tile is computed by one block in a fixed k order: deterministic, no atomics.
// The SwiGLU tile is 128 act columns j0..j0+127: B boxes gate j0, gate j0 + 64, up I + j0,
// up I + j0 + 64, so a thread's accumulator column c < 128 (gate j0 + c) and c + 128 (up) are in
// the same thread, as in the 128-wide kernel.
//
// Epilogues (per consumer warpgroup, independent of the other). The plain store and the SwiGLU
// forward write staged blocks of the 128-wide kernel's kind: 64 rows x 64 columns (kReduction)
// or 32 (kRows), bf16 pairs in the layout of a TMA box with the 128- or 64-byte swizzle
// (conflict-free both ways). A block wholly inside the output leaves by one TMA store
// (cp.async.bulk.tensor from shared memory, issued by one thread): the warpgroup goes on while
// TMA reads the staging and the global writes drain. Blocks that are not (the rows of an
// expert's last tile, kRows; the last SwiGLU columns) or unaligned outputs leave as 16-byte
// stores of consecutive threads a row. The two buffers alternate: the issuing thread waits for
// a TMA store's shared-memory read (then the warpgroup meets) only when its buffer comes round
// again, so one block is written while the previous one's store reads the other buffer, and a
// tile's last store is waited for in the next tile's epilogue, after its main loop.
//   plain store: 256 columns in blocks; kReduction (weight gradients: ~4 k-steps a tile at the
//     35B-A3B sizes, so the epilogue is a large share of a tile) and kRows alike;
//   SwiGLU forward: 128 act columns in rounds of one block each of gate, up and act (the
//     arithmetic of the 128-wide kernel's swiglu_pairs). It used to store from the registers in
//     4-byte column pairs, 8 rows apart: 4x the store instructions, half-used sectors, and it
//     measured 44% of the matmul rate against 59-66% for the plain-store GEMMs;
//   SwiGLU backward: eight rounds of 32 columns of d_act in fp32 through the staging, 8 columns
//     a thread and item; the gate_up lines of the tile are prefetched into L2 four k-steps before
//     the end of the main loop and each round's 16-byte gate / up loads are issued one round
//     ahead (a round's loads fly while the previous round computes and stores).
// Bounds as the 128-wide kernel: TMA zero-fills outside the tensors; A rows past an expert's end
// only feed unstored rows (kRows); kReduction zeroes the rows past the expert's end of the last
// k-step in shared memory (both consumer warpgroups share the work, fence.proxy.async, named
// barrier 1); a B box wholly past n is not loaded (its columns are never stored).
//
// Assumes: sm_90a (the body compiles to a trap elsewhere; the host launches only after checking
// the loaded binary); bf16 or fp16; operands TMA-compatible (vector_ok); the table fits in
// shared memory (3 (E + 1) ints after the ring; E up to ~1500 on an H100); N < 2^31.
#pragma once

#include <cuda.h>  // CUtensorMap (type only)

#include <cstdint>

#include "cuda/device_info.cuh"
#include "cuda/moe_grouped_gemm.cuh"
#include "cuda/moe_grouped_gemm_sm90.cuh"

namespace flashdelta::detail::cuda::moe::sm90_wide {

constexpr int kBM = 128, kBN = 256, kBK = 64;
constexpr int kBox = sm90::kBox;  // 64 x 64 elements, 128-byte rows
constexpr int kBoxBytes = sm90::kBoxBytes;
constexpr int kABoxes = kBM / kBox, kBBoxes = kBN / kBox;
constexpr int kStageBytes = (kABoxes + kBBoxes) * kBoxBytes;  // 48 KiB
constexpr int kStages = 4;
constexpr int kRingBytes = kStages * kStageBytes;
constexpr int kThreads = 3 * 128;
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;  // 128 x 40 + 256 x 232 <= 64 K
constexpr int kPrefetchSteps = 4;  // SwiGLU backward: prefetch gate_up this many k-steps ahead

// Epilogue blocks (staged, then stored by TMA or the threads): 64 rows of 128 bytes (64
// columns, kReduction) or of 64 bytes (32 columns, kRows), two staging buffers of one block per
// consumer warpgroup (32 or 16 KiB in all: with kRows's table, 2 x 2 x 8 KiB would not fit).
__host__ __device__ constexpr int block_row_bytes(Grouping grouping) {
  return grouping == Grouping::kReduction ? 128 : 64;
}
__host__ __device__ constexpr int block_bytes(Grouping grouping) {
  return 64 * block_row_bytes(grouping);
}
constexpr int kBuffers = 2;  // staging buffers per consumer warpgroup
// The table (kRows) follows the two consumer warpgroups' staging.
__host__ __device__ constexpr int table_offset(Grouping grouping) {
  return kRingBytes + 2 * kBuffers * block_bytes(grouping);
}
// Dynamic shared memory of one block: slack to align the ring to 1 KiB, ring, staging, table.
inline int smem_bytes(Grouping grouping, int num_experts) {
  const int table = grouping == Grouping::kRows ? 3 * (num_experts + 1) * 4 : 0;
  return 1024 + table_offset(grouping) + table;
}

// ---- PTX wrappers (sm_90a only): those of the 128-wide kernel, and the ones it lacks

using sm90::mbarrier_arrive;
using sm90::mbarrier_arrive_expect_tx;
using sm90::mbarrier_init;
using sm90::mbarrier_wait;
using sm90::named_barrier;
using sm90::warpgroup_barrier;
using sm90::smem_descriptor;
using sm90::shared_address;
using sm90::tma_load_2d;
using sm90::tma_load_3d;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}



#define FLASHDELTA_WGMMA_D128(X)                                                                  \
  X(0), X(1), X(2), X(3), X(4), X(5), X(6), X(7), X(8), X(9), X(10), X(11), X(12), X(13), X(14), \
      X(15), X(16), X(17), X(18), X(19), X(20), X(21), X(22), X(23), X(24), X(25), X(26), X(27), \
      X(28), X(29), X(30), X(31), X(32), X(33), X(34), X(35), X(36), X(37), X(38), X(39), X(40), \
      X(41), X(42), X(43), X(44), X(45), X(46), X(47), X(48), X(49), X(50), X(51), X(52), X(53), \
      X(54), X(55), X(56), X(57), X(58), X(59), X(60), X(61), X(62), X(63), X(64), X(65), X(66), \
      X(67), X(68), X(69), X(70), X(71), X(72), X(73), X(74), X(75), X(76), X(77), X(78), X(79), \
      X(80), X(81), X(82), X(83), X(84), X(85), X(86), X(87), X(88), X(89), X(90), X(91), X(92), \
      X(93), X(94), X(95), X(96), X(97), X(98), X(99), X(100), X(101), X(102), X(103), X(104),   \
      X(105), X(106), X(107), X(108), X(109), X(110), X(111), X(112), X(113), X(114), X(115),    \
      X(116), X(117), X(118), X(119), X(120), X(121), X(122), X(123), X(124), X(125), X(126),    \
      X(127)
#define FLASHDELTA_WGMMA_D_OPERAND(i) "+f"(d[i])

#define FLASHDELTA_WGMMA_M64N256K16(TYPES)                                                      \
  "{\n"                                                                                         \
  ".reg .pred accumulate;\n"                                                                    \
  "setp.ne.b32 accumulate, %132, 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPES                                          \
  " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19," \
  " %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37,"  \
  " %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55,"  \
  " %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73,"  \
  " %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91,"  \
  " %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107,"    \
  " %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122,"  \
  " %123, %124, %125, %126, %127},"                                                             \
  " %128, %129, accumulate, 1, 1, %130, %131;\n"                                                \
  "}\n"

// D[64 x 256] += A[64 x 16] B[16 x 256], both from shared memory (descriptors); kTransA /
// kTransB: the operand is MN-major; accumulate = 0 makes it D = A B (the first MMA of a tile).
template <typename T, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t desc_a,
                                                 uint64_t desc_b, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(FLASHDELTA_WGMMA_M64N256K16("bf16.bf16")
                 : FLASHDELTA_WGMMA_D128(FLASHDELTA_WGMMA_D_OPERAND)
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA ? 1 : 0), "n"(kTransB ? 1 : 0),
                   "r"(accumulate));
  } else {
    asm volatile(FLASHDELTA_WGMMA_M64N256K16("f16.f16")
                 : FLASHDELTA_WGMMA_D128(FLASHDELTA_WGMMA_D_OPERAND)
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA ? 1 : 0), "n"(kTransB ? 1 : 0),
                   "r"(accumulate));
  }
}

#undef FLASHDELTA_WGMMA_M64N256K16
#undef FLASHDELTA_WGMMA_D_OPERAND
#undef FLASHDELTA_WGMMA_D128

// ---- tiles

// Where one output tile lies. The producer and the consumers compute it independently from the
// tile index and the shared table (same inputs, same result).
struct TileInfo {
  int expert;
  int64_t m_tile_start;  // kRows: first row of the tile; kReduction: first m
  int64_t m_limit;       // rows (kRows) / m (kReduction) at and past this are not stored
  int64_t row_begin;     // the expert's rows [row_begin, row_end)
  int64_t k_extent;      // kRows: K; kReduction: the expert's row count
  int64_t n_tile_start;  // first output column (kSwiGLU: first act column)
  int num_k_tiles;
  int active_groups;  // consumer warpgroups with rows in the tile (1 or 2)
};

// The per-expert table of the kRows scheduler, in shared memory: first_tile[e] = row tiles of
// the experts before e (first_tile[E] = all of them), and each expert's clamped row range
// (offsets clamped to [0, N] as the other kernels do: malformed offsets never address memory
// out of bounds). Built by the whole block (it synchronises it); one round of kThreads experts
// at a time, every offset of a round read at once.
__device__ __forceinline__ void build_row_tile_table(const int32_t* offsets, int num_experts,
                                                     int64_t num_rows, int32_t* first_tile,
                                                     int32_t* row_begin, int32_t* row_end) {
  __shared__ int warp_tiles[kThreads / 32];
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  int carry = 0;  // row tiles of the earlier rounds (fits in int: N < 2^31)
  for (int base = 0; base < num_experts; base += kThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    int tiles = 0;
    if (e < num_experts) {
      const int64_t begin = clamp_index(offsets[e], 0, num_rows);
      const int64_t end = clamp_index(offsets[e + 1], begin, num_rows);
      row_begin[e] = static_cast<int32_t>(begin);
      row_end[e] = static_cast<int32_t>(end);
      tiles = static_cast<int>((end - begin + kBM - 1) / kBM);
    }
    int inclusive = tiles;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    if (lane == 31) warp_tiles[warp] = inclusive;
    __syncthreads();
    int before_warp = 0, round_total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      const int t = warp_tiles[w];
      before_warp += w < warp ? t : 0;
      round_total += t;
    }
    if (e < num_experts) first_tile[e] = carry + before_warp + inclusive - tiles;
    carry += round_total;
    __syncthreads();  // warp_tiles free for the next round
  }
  if (threadIdx.x == 0) first_tile[num_experts] = carry;
  __syncthreads();
}

// A SwiGLU tile covers kBN / 2 act columns (gate and up side by side).
template <Grouping kGrouping, Epilogue kEpilogue, typename T>
__device__ __forceinline__ TileInfo locate_tile(const GroupedGemmParams<T>& p, int64_t tile,
                                                int64_t n_tiles, const int32_t* first_tile,
                                                const int32_t* row_begin,
                                                const int32_t* row_end) {
  TileInfo t;
  int64_t n_tile;
  if constexpr (kGrouping == Grouping::kRows) {
    const int64_t row_tile = tile / n_tiles;
    n_tile = tile % n_tiles;
    // The last expert e with first_tile[e] <= row_tile: it has row tiles, and row_tile is one
    // of them (row_tile < first_tile[E], so a later expert with tiles starts past it).
    int lo = 0, hi = p.num_experts - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (first_tile[mid] <= row_tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    t.expert = lo;
    t.row_begin = row_begin[lo];
    t.m_tile_start = t.row_begin + (row_tile - first_tile[lo]) * kBM;
    t.m_limit = row_end[lo];
    t.k_extent = p.k_size;
  } else {
    const int64_t m_tiles = (p.m_size + kBM - 1) / kBM;
    const int64_t per_expert = m_tiles * n_tiles;
    t.expert = static_cast<int>(tile / per_expert);
    const int64_t within = tile % per_expert;
    n_tile = within % n_tiles;
    t.m_tile_start = (within / n_tiles) * kBM;
    t.m_limit = p.m_size;
    const int64_t begin = clamp_index(p.offsets[t.expert], 0, p.num_rows);
    const int64_t end = clamp_index(p.offsets[t.expert + 1], begin, p.num_rows);
    t.row_begin = begin;
    t.k_extent = end - begin;
  }
  t.n_tile_start = kEpilogue == Epilogue::kSwiGLU ? n_tile * (kBN / 2) : n_tile * kBN;
  t.num_k_tiles = static_cast<int>((t.k_extent + kBK - 1) / kBK);
  t.active_groups = t.m_tile_start + kBM / 2 < t.m_limit ? 2 : 1;
  return t;
}

// ---- the kernel

template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
__global__ void __launch_bounds__(kThreads, 1)
grouped_gemm_sm90_wide_kernel(const __grid_constant__ CUtensorMap tmap_a,
                              const __grid_constant__ CUtensorMap tmap_b,
                              const __grid_constant__ CUtensorMap tmap_c,
                              const __grid_constant__ CUtensorMap tmap_act,
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
  const uint32_t ring = (shared_address(smem_raw) + 1023u) & ~1023u;  // the swizzle needs 1 KiB
  uint8_t* const ring_ptr = smem_raw + (ring - shared_address(smem_raw));
  constexpr int kBlockRowBytes = block_row_bytes(kGrouping);
  constexpr int kBlockBytes = block_bytes(kGrouping);
  constexpr int kBlockCols = kBlockRowBytes / 2;  // of an epilogue block
  constexpr int kPairGroups = kBlockCols / 8;     // accumulator column groups of 8 a block
  int32_t* const first_tile =
      reinterpret_cast<int32_t*>(ring_ptr + table_offset(kGrouping));  // [E + 1]
  int32_t* const row_begin = first_tile + (p.num_experts + 1);                       // [E]
  int32_t* const row_end = row_begin + (p.num_experts + 1);                          // [E]

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  // Broadcast from lane 0: ptxas then knows the role is warp-uniform (wgmma in a path it thinks
  // divergent gets serialised, C7518).
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 128, 0);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(shared_address(&full_bar[s]), 1);   // the producer's arrive (+ the TMA bytes)
      mbarrier_init(shared_address(&empty_bar[s]), 8);  // one arrive per consumer warp
    }
    fence_mbarrier_init();
  } else if (threadIdx.x == 32) {
    const auto prefetch = [](const CUtensorMap* map) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
    };
    prefetch(&tmap_a);
    prefetch(&tmap_b);
    if (p.tma_store_ok) {
      prefetch(&tmap_c);
      if constexpr (kEpilogue == Epilogue::kSwiGLU) prefetch(&tmap_act);
    }
  }

  const int64_t n_tiles = kEpilogue == Epilogue::kSwiGLU
                              ? (p.intermediate + kBN / 2 - 1) / (kBN / 2)
                              : (p.n_size + kBN - 1) / kBN;
  int64_t num_tiles;
  if constexpr (kReduction) {
    num_tiles = static_cast<int64_t>(p.num_experts) * ((p.m_size + kBM - 1) / kBM) * n_tiles;
    __syncthreads();  // the barriers' initialisation
  } else {
    build_row_tile_table(p.offsets, p.num_experts, p.num_rows, first_tile, row_begin, row_end);
    num_tiles = static_cast<int64_t>(first_tile[p.num_experts]) * n_tiles;
  }
  const auto tile_at = [&](int64_t tile) {
    return locate_tile<kGrouping, kEpilogue>(p, tile, n_tiles, first_tile, row_begin, row_end);
  };

  // ---- producer: warpgroup 0, one lane
  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x != 0) return;
    int it = 0;  // k-steps issued by this block, over all its tiles: the ring position
    for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
      const TileInfo t = tile_at(tile);
      int b_boxes = kBBoxes;  // a box wholly past n is not loaded (its columns are not stored)
      if constexpr (kEpilogue != Epilogue::kSwiGLU) {
        while (b_boxes > 1 && t.n_tile_start + (b_boxes - 1) * kBox >= p.n_size) --b_boxes;
      }
      const auto stage_bytes = static_cast<uint32_t>((t.active_groups + b_boxes) * kBoxBytes);
      const auto e = static_cast<int32_t>(t.expert);
      for (int kt = 0; kt < t.num_k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        if (it >= kStages) mbarrier_wait(shared_address(&empty_bar[s]), ((it / kStages) - 1) & 1);
        const uint32_t bar = shared_address(&full_bar[s]);
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
          } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {  // gate j0, j0 + 64, up ...
            const int64_t row = t.n_tile_start + (h % 2) * kBox + (h >= 2 ? p.intermediate : 0);
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

  // ---- consumers: warpgroups 1 and 2
  setmaxnreg_inc<kConsumerRegisters>();
  const int group = warpgroup - 1;  // output rows [64 group, 64 group + 64) of each tile
  const int row_in_group = (warp % 4) * 16 + lane / 4;  // + 8 i: the accumulator rows
  const int thread_in_group = static_cast<int>(threadIdx.x) % 128;
  // The warpgroup's two staging buffers (the SwiGLU backward uses the 8 KiB or more as one).
  uint8_t* const staging = ring_ptr + kRingBytes + group * kBuffers * kBlockBytes;
  int staged_blocks = 0;  // blocks this warpgroup has staged: buffer staged_blocks % 2
  bool last_block_tma = false;  // whether the last one left by TMA (its read may be pending)

  int it = 0;  // k-steps consumed, over all tiles: the ring position (the producer's sequence)
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileInfo t = tile_at(tile);
    const bool active = __shfl_sync(0xffffffffu, group < t.active_groups ? 1 : 0, 0) != 0;
    // No zero-initialisation: the first MMA overwrites (scale-d = 0); see the 128-wide kernel.
    float acc[128];
    for (int kt = 0; kt < t.num_k_tiles; ++kt, ++it) {
      const int s = it % kStages;
      mbarrier_wait(shared_address(&full_bar[s]), (it / kStages) & 1);
      const uint32_t sa = ring + static_cast<uint32_t>(s * kStageBytes);
      const uint32_t sb = sa + kABoxes * kBoxBytes;
      if constexpr (kReduction) {
        const int64_t valid = t.k_extent - static_cast<int64_t>(kt) * kBK;  // rows of this step
        if (valid < kBK) {  // uniform over the block's consumers
          // Zero rows [valid, 64) of every box of the stage (the next expert's rows; a row is
          // one k, 128 bytes, so the swizzle never moves data across rows). Boxes not loaded in
          // this step are zeroed too: harmless, no TMA writes this stage until it is released.
          const int first = static_cast<int>(valid);
          const int chunks_per_box = (kBox - first) * 8;  // 16-byte chunks
          uint8_t* const stage_ptr = ring_ptr + s * kStageBytes;
          const int chunks = (kABoxes + kBBoxes) * chunks_per_box;
          for (int c = static_cast<int>(threadIdx.x) - 128; c < chunks; c += 256) {
            const int box = c / chunks_per_box, within = c % chunks_per_box;
            *reinterpret_cast<uint4*>(stage_ptr + box * kBoxBytes + first * 128 + within * 16) =
                make_uint4(0u, 0u, 0u, 0u);
          }
          // Generic-proxy writes before async-proxy (wgmma) reads: fence, then meet.
          fence_proxy_async();
          named_barrier<1, 256>();
        }
      }
      if (!active) {  // no rows in this warpgroup's half of the tile: release the stage as is
        if (lane == 0) mbarrier_arrive(shared_address(&empty_bar[s]));
        continue;
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
        wgmma_m64n256k16<T, kATrans, kBTrans>(acc, desc_a, desc_b, kt > 0 || kk > 0);
      }
      wgmma_commit();
      fence_accumulators(acc);
      if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
        if (kt == (t.num_k_tiles > kPrefetchSteps ? t.num_k_tiles - kPrefetchSteps : 0)) {
          // The epilogue's gate_up lines into L2: a row's 256 gate and 256 up columns are four
          // 128-byte lines each; the four lanes of a quad share two rows and take one line each.
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int64_t m = t.m_tile_start + group * 64 + row_in_group + 8 * i;
            const int64_t n = t.n_tile_start + 64 * (lane % 4);
            if (m < t.m_limit && n < p.n_size) {
              const T* gate_up_row = p.gate_up + m * p.ld_gate_up;
              asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gate_up_row + n));
              asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gate_up_row + p.intermediate + n));
            }
          }
        }
      }
      // Keep this k-step's MMAs in flight; the previous step's have completed: release its stage.
      wgmma_wait<1>();
      fence_accumulators(acc);
      if (kt > 0 && lane == 0) mbarrier_arrive(shared_address(&empty_bar[(it - 1) % kStages]));
    }
    wgmma_wait<0>();  // (nothing pending without k-steps; unconditional: see below)
    fence_accumulators(acc);
    if (t.num_k_tiles > 0 && active && lane == 0) {
      mbarrier_arrive(shared_address(&empty_bar[(it - 1) % kStages]));
    }
    // An idle warpgroup runs the epilogue too and stores nothing (its rows are all past
    // m_limit): skipping it by a branch here put the MMAs on what ptxas takes for a divergent
    // path, and it serialised every wgmma (C7518).
    // An expert without rows (kReduction) has a zero gradient: its accumulators were never
    // written, so every epilogue reads them through `value`.
    const bool has_k = !kReduction || t.num_k_tiles > 0;  // kRows: K > 0 (see the launcher)
    const auto value = [&](int i) { return has_k ? acc[i] : 0.0f; };

    // ---- epilogue. Thread holds acc[4 j + 2 i + c] (j < 32) for
    //   row  64 group + row_in_group + 8 i,  column  8 j + 2 (lane % 4) + c
    // Blocks of the warpgroup's 64 rows x kBlockCols columns in the storage dtype leave through
    // the staging (staged blocks of moe_grouped_gemm_sm90.cuh, the layout of a TMA box with the
    // kBlockRowBytes swizzle): stage_block writes the thread's pairs pair_at(jj, i) (columns
    // 8 jj + 2 (lane % 4), + 1 of the block, rows row_in_group + 8 i); store_block sends the
    // block out. Where the whole block lies inside the output (kRows: its 64 rows are the
    // expert's; SwiGLU: its columns < I, as gate_up's map spans gate and up) and the host
    // encoded the output maps, one thread stores it by TMA: the warps go back to work while TMA
    // reads the staging and the writes drain, instead of issuing the stores themselves.
    // Elsewhere (an expert's last rows, unaligned outputs) the threads store the rows in 16-byte
    // pieces.
    const int64_t block_row0 = t.m_tile_start + group * 64;
    const bool rows_inside =
        kReduction ? block_row0 < t.m_limit : block_row0 + 64 <= t.m_limit;  // kReduction: TMA clips m
    // A block goes to buffer staged_blocks % 2 once that buffer is free: the issuing thread
    // waits until the TMA store that read it has (older than the last store if the last block
    // left by TMA, else the last one), and the threads' own stores of it are behind the
    // barrier. So one block is written while the previous one's store reads the other buffer,
    // and a tile's last store is waited for in the next tile's epilogue, after its main loop.
    const auto stage_block = [&](auto pair_at) {
      const uint32_t buffer = shared_address(staging) + (staged_blocks % kBuffers) * kBlockBytes;
      if (thread_in_group == 0) {
        if (last_block_tma) {
          sm90::bulk_wait_group_read<kBuffers - 1>();
        } else {
          sm90::bulk_wait_group_read<0>();
        }
      }
      warpgroup_barrier(group);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int jj = 0; jj < kPairGroups; ++jj) {
          const int offset = tma_swizzle_offset<kBlockRowBytes>(row_in_group + 8 * i,
                                                                      8 * jj + 2 * (lane % 4));
          const StorePair<T> pair = pair_at(jj, i);
          uint32_t bits;
          memcpy(&bits, &pair, sizeof(bits));
          sm90::st_shared_u32(buffer + offset, bits);
        }
      }
      fence_proxy_async();  // the buffer is read by TMA (async proxy)
      warpgroup_barrier(group);
    };
    // map / tma_col: the block's first column in the map (the rows are block_row0.., kReduction
    // the expert t.expert); base / ld / col0 / col_limit: the same place for the threads' stores.
    const auto store_block = [&](const CUtensorMap* map, int64_t tma_col, bool cols_inside,
                                 T* base, int64_t ld, int64_t col0, int64_t col_limit) {
      const uint8_t* const buffer = staging + (staged_blocks % kBuffers) * kBlockBytes;
      last_block_tma = p.tma_store_ok && rows_inside && cols_inside;  // uniform over the warpgroup
      if (last_block_tma) {
        if (thread_in_group == 0) {
          const uint32_t src = shared_address(buffer);
          if constexpr (kReduction) {
            sm90::tma_store_3d(map, src, static_cast<int32_t>(tma_col),
                               static_cast<int32_t>(block_row0), t.expert);
          } else {
            sm90::tma_store_2d(map, src, static_cast<int32_t>(tma_col),
                               static_cast<int32_t>(block_row0));
          }
          sm90::bulk_commit_group();
        }
      } else {
        sm90::store_staged_block<kBlockRowBytes>(buffer, thread_in_group, base, ld, block_row0,
                                                 t.m_limit, col0, col_limit, p.vector_store_ok);
      }
      ++staged_blocks;
    };
    if constexpr (kEpilogue == Epilogue::kStore) {
      T* c_base = p.c;
      if constexpr (kReduction) c_base += static_cast<int64_t>(t.expert) * p.c_expert_stride;
#pragma unroll
      for (int r = 0; r < kBN / kBlockCols; ++r) {
        const int64_t col0 = t.n_tile_start + kBlockCols * r;
        if (col0 >= p.n_size) break;  // uniform
        stage_block([&](int jj, int i) {
          const int j = kPairGroups * r + jj;
          return StorePair<T>{from_f32<T>(value(4 * j + 2 * i)),
                              from_f32<T>(value(4 * j + 2 * i + 1))};
        });
        store_block(&tmap_c, col0, true, c_base, p.ldc, col0, p.n_size);
      }
    } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {
      // Accumulator columns 0-127: gate j0 + c; 128-255: up j0 + c. Rounds of kBlockCols act
      // columns, each storing its gate, up and act blocks in turn: rows leave whole instead of
      // in the accumulator layout's 4-byte pairs 8 rows apart.
#pragma unroll
      for (int r = 0; r < kBN / 2 / kBlockCols; ++r) {
        const int64_t col0 = t.n_tile_start + kBlockCols * r;
        if (col0 >= p.intermediate) break;  // uniform
        const auto pairs = [&](int jj, int i) {
          const int j = kPairGroups * r + jj;
          return sm90::swiglu_pairs<T>(value(4 * j + 2 * i), value(4 * (j + 16) + 2 * i),
                                       value(4 * j + 2 * i + 1), value(4 * (j + 16) + 2 * i + 1));
        };
        const bool cols_inside = col0 + kBlockCols <= p.intermediate;
        stage_block([&](int jj, int i) { return pairs(jj, i).gate; });
        store_block(&tmap_c, col0, cols_inside, p.gate_up, p.ld_gate_up, col0, p.intermediate);
        stage_block([&](int jj, int i) { return pairs(jj, i).up; });
        store_block(&tmap_c, p.intermediate + col0, cols_inside, p.gate_up + p.intermediate,
                    p.ld_gate_up, col0, p.intermediate);
        stage_block([&](int jj, int i) { return pairs(jj, i).act; });
        store_block(&tmap_act, col0, cols_inside, p.act, p.ld_act, col0, p.intermediate);
      }
    } else {  // kSwiGLUBackward, acc = d_act
      // Round r: columns [32 r, 32 r + 32) of the warpgroup's 64 rows, in fp32 in the staging
      // (rows of 128 bytes, 16-byte chunks XOR-swizzled by row % 8). Item b of a round: row
      // thread_in_group / 4 + 32 b, columns 8 (thread_in_group % 4).. of the round: the row
      // (and its offsets) is the same in every round, the columns the same for both items.
      const int item_col = 8 * (thread_in_group % 4);
      int64_t gate_up_offset[2], act_offset[2];  // of the item's row in gate_up / act
      bool row_ok[2];
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int64_t m = t.m_tile_start + group * 64 + thread_in_group / 4 + 32 * b;
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
      for (int r = 0; r < 8; ++r) {
        if (t.n_tile_start + 32 * r >= p.n_size) break;  // uniform
        if (r + 1 < 8) load_round(r + 1, gate[(r + 1) % 2], up[(r + 1) % 2]);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int row = row_in_group + 8 * i;
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int j = 4 * r + jj;
            const int col = 8 * jj + 2 * (lane % 4);  // within the round, even
            *reinterpret_cast<float2*>(staging + row * 128 + (((col / 4) ^ (row % 8)) * 16) +
                                       (col % 4) * 4) =
                make_float2(value(4 * j + 2 * i), value(4 * j + 2 * i + 1));
          }
        }
        warpgroup_barrier(group);
        const int64_t n = t.n_tile_start + 32 * r + item_col;
        const bool vector = p.vector_store_ok && n + 8 <= p.n_size;  // as load_round
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          if (!row_ok[b] || n >= p.n_size) continue;
          const int row = thread_in_group / 4 + 32 * b;
          const float4 lo = *reinterpret_cast<const float4*>(
              staging + row * 128 + (((item_col / 4) ^ (row % 8)) * 16));
          const float4 hi = *reinterpret_cast<const float4*>(
              staging + row * 128 + (((item_col / 4 + 1) ^ (row % 8)) * 16));
          const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
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
              swiglu_backward_values<T>(v[2 * w], g.x, u.x, dg.x, du.x, a.x);
              swiglu_backward_values<T>(v[2 * w + 1], g.y, u.y, dg.y, du.y, a.y);
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
            const int64_t m = t.m_tile_start + group * 64 + row;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              if (n + e < p.n_size) store_swiglu_backward(p, m, n + e, v[e]);
            }
          }
        }
        warpgroup_barrier(group);  // the staging is rewritten by the next round (or tile)
      }
    }
    // The last TMA store must have read its buffer before the block's shared memory goes.
    // Inside the loop: any instruction after it made ptxas spill the invariants it hoists out.
    if constexpr (kEpilogue != Epilogue::kSwiGLUBackward) {  // (which stores no staged blocks)
      if (tile + gridDim.x >= num_tiles && thread_in_group == 0) {
        sm90::bulk_wait_group_read<0>();
      }
    }
  }

#else
  __trap();  // never launched: the host checks for the sm_90a binary first
#endif
}

// ---- host side

// Whether this instantiation's sm_90a code is what the current device runs
// (sm90a_kernel_ready); also opts in to the device's largest shared-memory allocation.
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool wide_kernel_ready() {
  return sm90a_kernel_ready<grouped_gemm_sm90_wide_kernel<T, kGrouping, kBKContig, kEpilogue>>(
      [](const cudaFuncAttributes& attr, int device) {
        auto* kernel = grouped_gemm_sm90_wide_kernel<T, kGrouping, kBKContig, kEpilogue>;
        const int optin = device_info(device).max_smem_per_block_optin -
                          static_cast<int>(attr.sharedSizeBytes);
        if (optin < smem_bytes(kGrouping, 0)) return false;
        FLASHDELTA_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
        FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
            cudaSharedmemCarveoutMaxShared));
        return true;
      });
}

// The output tensor maps of the TMA-stored epilogues (boxes of one epilogue block: 64 rows of
// 64 columns, 128-byte swizzle, kReduction; of 32 columns, 64-byte swizzle, kRows): kStore: c,
// [N][n] (kRows) or [E][m][n] (kReduction); kSwiGLU: gate_up [N][2I] and act [N][I]. False (the threads store instead) for the SwiGLU backward or when a map cannot
// be encoded (an output or stride not 16-byte aligned).
template <typename T, Grouping kGrouping, Epilogue kEpilogue>
bool make_store_tensor_maps(const GroupedGemmParams<T>& p, CUtensorMap* map_c,
                            CUtensorMap* map_act) {
  const DType dtype = std::is_same_v<T, __nv_bfloat16> ? DType::kBFloat16 : DType::kFloat16;
  constexpr int kRowBytes = block_row_bytes(kGrouping);
  const uint32_t box[3] = {static_cast<uint32_t>(kRowBytes / 2), 64, 1};  // an epilogue block
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  if constexpr (kEpilogue == Epilogue::kStore) {
    if constexpr (kGrouping == Grouping::kReduction) {
      const uint64_t dims[3] = {u(p.n_size), u(p.m_size), u(p.num_experts)};
      const uint64_t strides[2] = {u(p.ldc) * 2, u(p.c_expert_stride) * 2};
      return encode_tensor_map_2byte(map_c, dtype, p.c, 3, dims, strides, box, kRowBytes);
    } else {
      const uint64_t dims[2] = {u(p.n_size), u(p.num_rows)};
      const uint64_t strides[1] = {u(p.ldc) * 2};
      return encode_tensor_map_2byte(map_c, dtype, p.c, 2, dims, strides, box, kRowBytes);
    }
  } else if constexpr (kEpilogue == Epilogue::kSwiGLU) {
    const uint64_t gate_up_dims[2] = {u(2 * p.intermediate), u(p.num_rows)};
    const uint64_t gate_up_strides[1] = {u(p.ld_gate_up) * 2};
    const uint64_t act_dims[2] = {u(p.intermediate), u(p.num_rows)};
    const uint64_t act_strides[1] = {u(p.ld_act) * 2};
    return encode_tensor_map_2byte(map_c, dtype, p.gate_up, 2, gate_up_dims, gate_up_strides,
                                   box, kRowBytes) &&
           encode_tensor_map_2byte(map_act, dtype, p.act, 2, act_dims, act_strides, box,
                                   kRowBytes);
  } else {
    return false;
  }
}

// Launches one grouped GEMM on the wide persistent path; false (nothing launched) when it does
// not apply: operands not TMA-compatible, nothing to compute (the sm_80 launcher writes the
// zeros of empty problems), the expert table does not fit, or no sm_90a code for the device.
// The caller has checked that the device is sm_90.
// `tma_stores`: false keeps every epilogue block on the threads' stores (a measuring switch).
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
bool try_launch_grouped_gemm_sm90_wide(const GroupedGemmParams<T>& p, cudaStream_t stream,
                                       bool tma_stores) {
  if (!p.vector_ok || p.num_rows == 0 || p.num_experts == 0) return false;
  if (kGrouping == Grouping::kRows && p.k_size == 0) return false;  // the sm_80 path's zeros
  if (!wide_kernel_ready<T, kGrouping, kBKContig, kEpilogue>()) return false;
  auto* kernel = grouped_gemm_sm90_wide_kernel<T, kGrouping, kBKContig, kEpilogue>;
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
  GroupedGemmParams<T> q = sm90::with_epilogue_flags<kEpilogue>(p);
  CUtensorMap map_c = map_a, map_act = map_a;  // copies of a valid map where unused
  q.tma_store_ok =
      tma_stores && make_store_tensor_maps<T, kGrouping, kEpilogue>(q, &map_c, &map_act);
  const int64_t blocks = tiles_bound < info.sm_count ? tiles_bound : info.sm_count;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(map_a, map_b, map_c, map_act,
                                                                     q);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  return true;
}

}  // namespace flashdelta::detail::cuda::moe::sm90_wide
