// The state passes' chunk tiles (state.cu, dstate.cu): W, K, Q (64 x 128) and M (64 x 64) of
// one chunk, read by ldmatrix as B operands. Two ways in:
//   cp.async (any device): 16-byte copies by every thread into rows padded to kLdD / kLdC
//     elements, so that ldmatrix's 8 rows of one 16-byte piece hit distinct banks;
//   TMA (sm_90): one thread loads each tile as 64 x 64 boxes of a tensor map over the workspace,
//     with the 128-byte swizzle (piece j of a 128-byte box row r stored at piece j ^ (r % 8):
//     conflict-free for ldmatrix too), completion counted in bytes on an mbarrier.
// Why TMA: at 1 x 32768 the forward's state pass runs one block of 4 warps per SM, and its
// ~30 cp.async a thread per chunk (60 KB) sat on the recurrence's chain: ncu put ~26% of the
// pass's stall samples on the integer work between them (bench/NOTES.md, session 12). With TMA a
// chunk is 7 box loads from one thread (plus U and gamma by cp.async: 2 or 3 a thread). One
// bulk copy per row instead (321 a chunk, the padded layout kept) measured 2x slower: the TMA
// unit takes small copies one at a time.
// SmemTile hides the layout from the products: the kernels address pieces by (row, column).
#pragma once

#include <cuda.h>  // CUtensorMap (type only)

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/chunk_gated_delta_rule/common.cuh"
#include "cuda/device_info.cuh"
#include "cuda/tensor_map.cuh"
#include "cuda/tma.cuh"

namespace flashdelta::detail::cuda::chunk {

// A bf16 tile of kC rows in shared memory at `base` (a shared-memory address), addressed by the
// 16-byte piece holding columns col .. col + 7 (col a multiple of 8) of a row: padded rows kLd
// elements apart, or (kSwizzled) TMA's 128-byte swizzle over 64-column boxes of kC rows stored
// one after the other (base 1024-byte aligned).
template <int kLd, bool kSwizzled>
struct SmemTile {
  uint32_t base;
  __device__ __forceinline__ uint32_t at(int row, int col) const {
    using Layout = std::conditional_t<kSwizzled, SwzTile<kC>, RowTile<kLd>>;
    return base + static_cast<uint32_t>(Layout::at(row, col) * 2);
  }
};

// load_b_rows / load_b_cols of common.cuh (the same fragments) from a SmemTile.
template <class Tile>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const Tile& x, int n0, int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  ldmatrix_x4_at(b, x.at(n0 + (j >> 1) * 8 + r, k0 + (j & 1) * 8));
}
template <class Tile>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const Tile& x, int n0, int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  ldmatrix_x4_trans_at(b, x.at(k0 + (j & 1) * 8 + r, n0 + (j >> 1) * 8));
}

// The shared-memory struct of a state pass: at `smem_raw`, or (kTma) at the next 1 KB boundary,
// which the swizzled tiles need (the launch allocates 1 KB more for the shift).
template <bool kTma>
__device__ __forceinline__ unsigned char* tile_smem_base(unsigned char* smem_raw) {
  if constexpr (!kTma) return smem_raw;
  return smem_raw + ((1024u - (shared_address(smem_raw) & 1023u)) & 1023u);
}

// kTma: thread 0 initialises the two buffers' full barriers (one arrival a phase: the loading
// thread's, with the bytes), and the block barrier publishes them before any copy counts on them.
// Every thread calls it.
template <bool kTma>
__device__ __forceinline__ void init_tile_barriers(uint64_t (&full)[2]) {
  if constexpr (kTma) {
    if (threadIdx.x == 0) {
      mbarrier_init(shared_address(&full[0]), 1);
      mbarrier_init(shared_address(&full[1]), 1);
      fence_mbarrier_init();
    }
    __syncthreads();
  }
}

// Tensor maps over the workspace tiles the state passes read: [rows, 128] (W, K, Q) and
// [rows, 64] (M) bf16, boxes of 64 x 64, 128-byte swizzle.
struct ChunkTileMaps {
  CUtensorMap w, kn, qn, m;
};

// Encodes them (host); false where TMA cannot serve (not sm_90, a row count past int32
// coordinates, a driver that refuses): the caller then takes the cp.async path.
inline bool encode_chunk_tile_maps(ChunkTileMaps* maps, const ChunkParams& p, bool is_sm90) {
  const uint64_t value_rows = static_cast<uint64_t>(p.num_slots) * p.num_v_heads * kC;
  const uint64_t key_rows = static_cast<uint64_t>(p.num_slots) * p.num_heads * kC;
  if (!is_sm90 || value_rows == 0 || value_rows >= (uint64_t{1} << 31) ||
      key_rows >= (uint64_t{1} << 31))
    return false;
  const uint32_t box[2] = {64, 64};
  auto encode = [&](CUtensorMap* map, const bf16* base, uint64_t cols, uint64_t rows) {
    const uint64_t dims[2] = {cols, rows};
    const uint64_t strides[1] = {cols * sizeof(bf16)};
    return encode_tensor_map_2byte(map, DType::kBFloat16, base, 2, dims, strides, box, 128);
  };
  return encode(&maps->w, p.ws.w, kD, value_rows) && encode(&maps->kn, p.ws.kn, kD, key_rows) &&
         encode(&maps->qn, p.ws.qn, kD, key_rows) && encode(&maps->m, p.ws.m, kC, value_rows);
}

// Host, per launch: whether a state pass takes its tiles by TMA (sm_90, the maps encoded into
// `maps`, and not FLASHDELTA_GDN_TMA_TILES=0, which forces cp.async for A/B).
inline bool chunk_tiles_by_tma(ChunkTileMaps* maps, const ChunkParams& p, bool is_sm90) {
  const char* env = std::getenv("FLASHDELTA_GDN_TMA_TILES");
  return !(env != nullptr && std::strcmp(env, "0") == 0) &&
         encode_chunk_tile_maps(maps, p, is_sm90);
}

constexpr uint32_t kTileBytes64x128 = kC * kD * sizeof(bf16);
constexpr uint32_t kTileBytes64x64 = kC * kC * sizeof(bf16);

// A 64 x 128 tile (rows row0 .. row0 + 63 of the map) as two boxes into `dst` (16 KB, 1024-byte
// aligned), by one thread, counted on `bar`.
__device__ __forceinline__ void tma_load_tile64x128(uint32_t dst, const CUtensorMap* map,
                                                    uint32_t bar, int64_t row0) {
  tma_load_2d(dst, map, bar, 0, static_cast<int32_t>(row0));
  tma_load_2d(dst + kC * 128, map, bar, 64, static_cast<int32_t>(row0));
}

// The tiles of one chunk that the state passes read, into the shared tiles w, k (and q, m where
// kWithQM): rows value_row .. + 63 of W and M (the (slot, value head) block), key_row .. + 63 of
// K and Q (the (slot, key head) block). kTma: thread 0 announces the bytes on `bar` and loads
// the boxes; else every thread issues its cp.async copies into padded rows (to be committed by
// the caller with its other copies).
template <bool kTma, bool kWithQM, int kThreads>
__device__ __forceinline__ void load_chunk_tiles(const ChunkParams& p, const ChunkTileMaps& maps,
                                                 int64_t value_row, int64_t key_row, bf16* w,
                                                 bf16* k, bf16* q, bf16* m, uint32_t bar) {
  if constexpr (kTma) {
    if (threadIdx.x != 0) return;
    mbarrier_arrive_expect_tx(bar, kWithQM ? 3 * kTileBytes64x128 + kTileBytes64x64
                                           : 2 * kTileBytes64x128);
    tma_load_tile64x128(shared_address(w), &maps.w, bar, value_row);
    tma_load_tile64x128(shared_address(k), &maps.kn, bar, key_row);
    if constexpr (kWithQM) {
      tma_load_tile64x128(shared_address(q), &maps.qn, bar, key_row);
      tma_load_2d(shared_address(m), &maps.m, bar, 0, static_cast<int32_t>(value_row));
    }
  } else {
    copy_tile_async<kThreads, kC, kD, kD, RowTile<kLdD>>(p.ws.w + value_row * kD, w);
    copy_tile_async<kThreads, kC, kD, kD, RowTile<kLdD>>(p.ws.kn + key_row * kD, k);
    if constexpr (kWithQM) {
      copy_tile_async<kThreads, kC, kD, kD, RowTile<kLdD>>(p.ws.qn + key_row * kD, q);
      copy_tile_async<kThreads, kC, kC, kC, RowTile<kLdC>>(p.ws.m + value_row * kC, m);
    }
  }
}

// ---- The stored states: S^T entering each chunk (state.cu) and dS'^T leaving it (dstate.cu),
// bf16 [slot, hv, 128 rows v, 128 k]. A state pass's warp holds its slice [16 rows v x kKS k] in
// the mma accumulator layout, x[nt] = (v, k), (v, k + 1), (v + 8, k), (v + 8, k + 1) with
// v = v0 + lane / 4 and k = k_base + 8 nt + 2 (lane % 4). On sm_90 the slice goes by stmatrix
// into a per-warp shared tile with the TMA swizzle of its row length (128 bytes: the 128-byte
// swizzle, 16-byte chunk j of row r at j ^ (r % 8); 64 bytes: the 64-byte swizzle,
// j ^ ((r / 2) % 4)) and leaves by one TMA tensor store per warp and chunk; elsewhere by
// 2 x kNT 4-byte stores a lane (8 rows x 16 bytes an instruction). (H100, 8 x 4096, forward state
// pass keeping the states, 4-byte -> TMA: 1029 -> 939 us.)
template <int kKS>
struct StateTile {
  static constexpr int kRowBytes = kKS * 2;
  static constexpr int kBytes = 16 * kRowBytes;
  __device__ static uint32_t offset(int r, int j) {  // chunk j of row r
    return static_cast<uint32_t>(tma_swizzle_offset<kRowBytes>(r, 8 * j));
  }
};

// Shared memory the warps' staging tiles take past a kernel's own (1 KB aligned: the swizzle).
template <int kWarps, int kKS>
constexpr size_t state_tiles_bytes() {
  return 1024 + static_cast<size_t>(kWarps) * StateTile<kKS>::kBytes;
}

// Host: the tensor map over a states buffer ([rows, 128], boxes of kKS x 16 with the swizzle of
// the row length) for a kernel of `smem` bytes of its own; false, for the 4-byte path, where there
// is no buffer, off sm_90, past int32 row coordinates, where the tiles do not fit beside `smem`,
// under FLASHDELTA_GDN_TMA_STATES=0 (A/B) or where the driver refuses.
template <int kWarps, int kKS>
inline bool encode_states_map(CUtensorMap* map, const bf16* states, const ChunkParams& p,
                              size_t smem) {
  const uint64_t rows = static_cast<uint64_t>(p.num_slots) * p.num_v_heads * kD;
  const char* env = std::getenv("FLASHDELTA_GDN_TMA_STATES");
  if (states == nullptr || !device_info().is_sm90 || rows == 0 || rows >= (uint64_t{1} << 31) ||
      (env != nullptr && std::strcmp(env, "0") == 0) ||
      smem + state_tiles_bytes<kWarps, kKS>() >
          static_cast<size_t>(device_info().max_smem_per_block_optin))
    return false;
  const uint64_t dims[2] = {kD, rows};
  const uint64_t strides[1] = {kD * sizeof(bf16)};
  const uint32_t box[2] = {static_cast<uint32_t>(kKS), 16};
  return encode_tensor_map_2byte(map, DType::kBFloat16, states, 2, dims, strides, box,
                                 StateTile<kKS>::kRowBytes);
}

// A warp's slice to rows v0 .. v0 + 15 (of state block (slot, hv): `state_row` is its row 0 in
// the map, `state` its first element), columns k_base .. k_base + kKS - 1, given as the bf16 A
// fragments of its k16 blocks (a[kb] = pack_a_from_c(x, kb) of the accumulators x). TMA path
// (tma: the host's choice): through the warp's staging tile at shared address `tile`, waiting
// first for the previous store's reads where the tile holds one (`reuse`). The caller waits for
// the last store (tma_store_wait<false>) before the block exits.
template <int kKS>
__device__ __forceinline__ void store_state_fragments(const uint32_t (&a)[kKS / 16][4], bool tma,
                                                      const CUtensorMap* map, uint32_t tile,
                                                      bool reuse, int64_t state_row, bf16* state,
                                                      int v0, int k_base) {
  const int lane = threadIdx.x & 31;
  if (tma) {
    if (reuse) {
      if (lane == 0) tma_store_wait<true>();
      __syncwarp();
    }
    const int m = lane >> 3, r = (lane & 7) + 8 * (m & 1);  // this lane's row address
#pragma unroll
    for (int kb = 0; kb < kKS / 16; ++kb)  // n8 tiles 2 kb, 2 kb + 1
      stmatrix_x4(tile + StateTile<kKS>::offset(r, 2 * kb + (m >> 1)), a[kb][0], a[kb][1],
                  a[kb][2], a[kb][3]);
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) tma_store_tile(map, tile, k_base, static_cast<int32_t>(state_row + v0));
  } else {
    const int v_lo = v0 + (lane >> 2);
#pragma unroll
    for (int kb = 0; kb < kKS / 16; ++kb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // n8 tile 2 kb + h
        const int k = k_base + (2 * kb + h) * 8 + 2 * (lane & 3);
        *reinterpret_cast<uint32_t*>(state + v_lo * kD + k) = a[kb][2 * h];
        *reinterpret_cast<uint32_t*>(state + (v_lo + 8) * kD + k) = a[kb][2 * h + 1];
      }
    }
  }
}

// The same from the fp32 accumulators x[nt] = (v, k), (v, k + 1), (v + 8, k), (v + 8, k + 1).
template <int kKS, int kNT>
__device__ __forceinline__ void store_state_slice(const float (&x)[kNT][4], bool tma,
                                                  const CUtensorMap* map, uint32_t tile,
                                                  bool reuse, int64_t state_row, bf16* state,
                                                  int v0, int k_base) {
  static_assert(kNT * 8 == kKS && kNT % 2 == 0, "the slice's n8 tiles, in pairs");
  uint32_t a[kKS / 16][4];
#pragma unroll
  for (int kb = 0; kb < kKS / 16; ++kb) {
    a[kb][0] = pack_bf16(x[2 * kb][0], x[2 * kb][1]);
    a[kb][1] = pack_bf16(x[2 * kb][2], x[2 * kb][3]);
    a[kb][2] = pack_bf16(x[2 * kb + 1][0], x[2 * kb + 1][1]);
    a[kb][3] = pack_bf16(x[2 * kb + 1][2], x[2 * kb + 1][3]);
  }
  store_state_fragments<kKS>(a, tma, map, tile, reuse, state_row, state, v0, k_base);
}

// The shared address of warp `warp`'s staging tile: past a kernel's `bytes` of shared memory
// from `base`, at the next 1 KB boundary.
template <int kKS>
__device__ __forceinline__ uint32_t state_tile_address(const void* base, size_t bytes, int warp) {
  return ((shared_address(base) + static_cast<uint32_t>(bytes) + 1023u) & ~1023u) +
         static_cast<uint32_t>(warp * StateTile<kKS>::kBytes);
}

}  // namespace flashdelta::detail::cuda::chunk
