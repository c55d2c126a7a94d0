// Chunked gated delta rule, CUDA backward, the per-chunk gradients: everything that, once the
// state entering a chunk (S) and the gradient of the state leaving it (dS') are known, depends on
// that chunk alone (launch.cu, above backward(), has the whole picture; the CPU kernel's
// `backward()` has the derivation, line by line, which this kernel follows in the same order).
//
// Per work item (slot, key head), one 64-token chunk, 512 threads (16 warps) walk the HV / H
// value heads that read this key head, in head order; a persistent block takes item after item.
// Operands are bf16 tiles in shared memory in the 128-byte swizzled layout (SwzTile), products
// run on the tensor cores (bwd::gemm_apply: wgmma, each warpgroup a quarter of the columns,
// results handled in registers by an epilogue); row and column reductions go by shuffles within
// a warp, then across warps through small per-warp arrays, and the reverse cumsum by a warp scan,
// all in fixed orders: deterministic. Per value head:
//   Vn  = U - W S                               (W, U, M, T, gamma from the forward's intra pass)
//   dVn = M^T dO + diag(r) K dS',   dr_i = (K dS')_i . Vn_i
//   dM  = dO Vn^T: dgamma += rows(dM * M) - cols(dM * M);   dMg = dM * Gamma
//   dQ  = diag(e) dO S^T + dMg K,   de_i = (dO S^T)_i . q_i
//   dK  = dMg^T Q + diag(r) Vn dS'^T + diag(b e) T^T dW + dA K + dA^T K
//   dW  = -dVn S^T;  dT = (dVn V^T) diag(b) + (dW K^T) diag(b e)
//   dv  = diag(b) T^T dVn;  dbeta = rows(T^T dVn * V) + e rows(T^T dW * K) + rows(dA * KKg)
//   dA  = -strictLower(T^T dT T^T): dgamma += rows(dA * A) - cols(dA * A);  dA <- dA b Gamma
//   dg  = reverse cumsum of dgamma (+ e de - r dr, + the last row's e_last S.dS' + sum r dr)
// dv, dg, dbeta are stored per value head in their tensors' dtypes. dQ and dK (with respect to
// the normalised q and k) are summed over the value heads in registers, in the products' fragment
// layout (bwd::RegTile, 16 registers each at 16 warps): the products that make them add their
// accumulators (times the row gates) straight in, with no fp32 tile and no barrier. At the end
// the l2norm backward (dx = inv (dy - y (y . dy)), inv = (|x|^2 + eps)^-1/2) runs on those
// registers, its row dots by shuffles and per-column-group parts; dq, dk are stored once, in q's
// dtype (store_key_grad). No fp32 per-value-head rows, no atomics, no reduction kernel.
// Element-wise work that follows a product element by element (Vn = U - W S over U, dM's gates
// over M, dT's column gates, dA's gates), the row dots dr, de, dKb.k (per column group of warps,
// summed in a fixed order) and the row and column sums of dM * M, dA * A, dA * KKg that make
// dgamma and dbeta (per column group, per band of 16 rows) run in the products' epilogues on
// their registers; dv (2-byte dtypes) is written from them over Vn's tile and leaves as whole
// rows (copy_rows_out: from the accumulator layout, 8 rows a store instruction, it cost ~300 us
// at 1 x 32768, H100). The pairs of products that sum into one result
// (dVn's, dQ's, dT's) chain in registers: the first's epilogue keeps its (gated) result as a
// bwd::ChainTile and the second starts its accumulators from it (bwd::gemm_apply_onto), so the
// one fp32 tile holds only K K^T, made once per key head (it does not depend on the value head).
// Every workspace tile (W, U, M, T, S^T, dS'^T, and the gates gamma, beta) of a value head comes
// by cp.async; dO too when it is bf16 with 16-byte rows, else by 16-byte (or element) loads
// issued before any is used, converted by the block. The next value head's tiles (this item's
// next head, or after its last the next item's first) are copied as soon as this one's last
// product with each is done (S^T and dS'^T after dW; W, U, bf16 dO and the gates after dKb; M and
// T after dA: about 125 KB of 130), behind the rest of its work; only the block's very first
// head waits for its copies. The key head's normalised q and k tiles (and their rows' inverse
// norms) come the same way from what the intra pass stored, issued at the previous item's end
// and waited for only after the first head's Vn product (loaded and normalised by the block at
// the item's start, they stalled the SM: 2400 -> 2244 us at 1 x 32768). v (bf16, 16-byte rows)
// likewise streams into dO's buffer once dO is done with, behind dQ's second product, dK and dW.
//
// Launch: persistent, as many blocks as the device holds at once (one per SM: 132 on an H100),
// block b taking items b, b + grid, ... (item = key head * slots + slot; empty varlen slots
// skipped), so that the next item's first copies run behind the current item's last products
// (a grid of one block per item exposed them: ~2 us per item, 124 items per SM at 1 x 32768).
// The static stride keeps the schedule, and every result, independent of timing. 512 threads,
// <= 128 registers (__launch_bounds__(512, 1)), 212 KB of shared memory (Hopper's 227 KB opt-in;
// an A100's 163 KB is too small for this version). Work per chunk and value head: 17 products
// (+ K K^T once per key head), ~11 M multiply-adds, for ~130 KB read.
// Why 16 warps in one block rather than two blocks of 8 (bench/NOTES.md, "grads round 3"): the
// working set of one value head is ~210 KB (q, k, dO/v, W/dW, U/Vn, dVn: 6 x 16 KB; S^T, dS'^T:
// 2 x 32 KB; M, T, X: 3 x 8 KB; K K^T in fp32 17 KB), so a second block per SM (<= 113 KB) would
// need the states streamed and products split across kernels with their intermediates in global
// memory. Doubling the warps of the one block gives the same 16 warps per SM (the latency cover
// that 2 blocks would) at the same bytes: each product's output is split over 4 bands of 16 rows
// x 4 column groups (bwd::GemmLayout), so every warp's share of a product halves, and the dq,
// dk register sums halve (16 + 16 registers), which is what brings the kernel to 128 registers.
// The cost: 16 warps meet at each block barrier, so barriers are few: 10 per value head, each
// where a product reads a tile that an epilogue or a copy wrote since the last (publish_tiles:
// with the proxy fence that wgmma's reads need), or where a copy overwrites a tile that products
// read. Products on wgmma (session 15) instead of mma.sync on ldmatrix fragments: every
// warpgroup reads whole operand tiles (A four times over, as with ldmatrix at 16 warps) but
// without fragment registers or load instructions: grads 2800 -> 2454 us (H100, 1 x 32768).
// With them went the band barriers of the mma.sync version (a band's warps syncing for rows that
// only they read: under wgmma every warpgroup reads all rows), and dVn got its own buffer (16 KB,
// freed by the fp32 tile's shrinking to K K^T), which saves three barriers a head.
#include <cfloat>
#include <cstddef>
#include <type_traits>

#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/bwd_frag.cuh"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/tiles.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

// The layout of every 64-row operand tile (q, k, dO / v, W, U, M, T, X): 128-byte swizzled, as
// wgmma reads it (common.cuh's SwzTile); S^T and dS'^T are SwzTile<kD>.
using Tile = SwzTile<kC>;

// What depends on the block's size: 512 threads (16 warps). The code takes 256 too (8 warps, the
// previous shape: H100, 1 x 32768, 4864 us against 3958 at 16 warps; 8 x 4096 4825 against 3965),
// which is no longer built.
template <int kThreads>
struct GradShape {
  static constexpr int kWarps = kThreads / 32;
  // The warps of a 16-row band of a 128-column product (bwd::GemmLayout): row dots made in
  // epilogues come as one partial per group, added in group order.
  static constexpr int kColGroups = bwd::GemmLayout<kD, kThreads>::kColGroups;
};

// One work item of the persistent grid: a (slot, key head) pair, item = hk * num_slots + slot,
// with its chunk; slot < 0: none (the block is done).
struct GradItem {
  int64_t index, slot;
  int hk;
  ChunkRef ch;
};

// The first item with a non-empty chunk among index, index + gridDim.x, ... (varlen layouts leave
// up to one empty slot per sequence), or none.
__device__ inline GradItem live_item_from(const ChunkParams& p, int64_t index) {
  const int64_t items = p.num_slots * p.num_heads;
  for (; index < items; index += gridDim.x) {
    const int64_t slot = index % p.num_slots;
    const ChunkRef ch = chunk_of_slot(p, slot);
    if (ch.len > 0) return {index, slot, static_cast<int>(index / p.num_slots), ch};
  }
  return {items, -1, 0, ChunkRef{0, 0, 0, 0, 0}};
}

// The value head whose tiles the block prefetches during the current one: the next of this key
// head's, or (after the last) the next item's first.
struct HeadRef {
  int64_t slot;
  int hv;
  ChunkRef ch;
};

__device__ __forceinline__ HeadRef next_head(const ChunkParams& p, const GradItem& next_item,
                                             int64_t slot, int hv, const ChunkRef& ch, int rep) {
  if (rep + 1 < p.group) return {slot, hv + 1, ch};
  return {next_item.slot, next_item.hk * p.group, next_item.ch};
}

template <int kThreads>
struct GradSmem {
  static constexpr int kWarps = GradShape<kThreads>::kWarps;
  static constexpr int kColGroups = GradShape<kThreads>::kColGroups;
  // The products' operands: bf16 tiles in the 128-byte swizzled layout (SwzTile; each a whole
  // number of 1 KB swizzle groups, the first at the block's 1 KB-aligned base).
  bf16 q[kC * kD];        // normalised, scaled q
  bf16 k[kC * kD];        // normalised k
  bf16 dov[kC * kD];      // dO, then v
  bf16 w_dw[kC * kD];     // W, then dW
  bf16 u_vn[kC * kD];     // U, then Vn (formed in place)
  bf16 dvn[kC * kD];      // dVn
  bf16 st[kD * kD];       // S^T entering the chunk   [v][k]
  bf16 dst[kD * kD];      // dS'^T leaving the chunk  [v][k]
  bf16 m[kC * kC];        // M, then dM * Gamma
  bf16 t[kC * kC];        // T
  bf16 x[kC * kC];        // dT, then T^T dT, then dA * b * Gamma
  float f[kC * kLdCf];  // K K^T (fp32 [64, kLdCf]), made once per key head
  float gamma[kC], beta[kC], e[kC], r[kC], dgam[kC], dr[kC], dbeta[kC];
  float q_inv[kC], k_inv[kC];  // 1 / |x| of the key head's q and k rows (l2norm)
  float next_gates[2][kC];     // the next value head's gamma, beta, copied by warp 0 (below)
  float red[kWarps];  // d e_last per warp
  // The block's current and next work items (grads_kernel's persistent loop).
  GradItem item[2];
  // Row dot products made in products' epilogues: one partial per column group (the warps that
  // share the rows), added in group order where used (row_part_sum).
  float dr_part[kColGroups][kC], de_part[kColGroups][kC], dkb_part[kColGroups][kC],
      dvb_part[kColGroups][kC];
  // Row and column sums of the 64 x 64 element-wise products whose sums make dgamma and dbeta
  // (dM * M, then dA * KKg and dA * A), made in the products' epilogues: rows per column group,
  // columns per band of 16 rows (col_part[band][column]).
  float row_part_a[kColGroups][kC], row_part_b[kColGroups][kC], col_part[4][kC];
};
static_assert(sizeof(GradSmem<256>) + 1024 <= 227 * 1024 &&
                  sizeof(GradSmem<512>) + 1024 <= 227 * 1024,
              "over Hopper's shared memory per block (with the shift to a 1 KB boundary)");
static_assert(offsetof(GradSmem<512>, q_inv) % 16 == 0 && offsetof(GradSmem<512>, k_inv) % 16 == 0,
              "the inverse norms arrive by 16-byte cp.async");

// The block barrier that publishes tiles written since the last one (stores, cp.async) to the
// products: a warpgroup's wgmma reads whole operand tiles through the async proxy, so every
// writer fences first (cuda/wgmma.cuh).
__device__ __forceinline__ void publish_tiles() {
  fence_proxy_async();
  __syncthreads();
}

// Sum over a warp, the same butterfly order on every lane (deterministic).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Starts copying S^T or dS'^T of (slot, hv) from the workspace (bf16 [128, 128], rows v) into a
// tile; rows v >= V are zero-filled (rows past the state kernels' column tiles are never written;
// columns k >= K are written, zero, by them). Commit and wait are the caller's.
template <int kThreads>
__device__ __forceinline__ void copy_state_async(const bf16* src, int V, bf16* tile) {
  copy_tile_async<kThreads, kD, kD, kD, SwzTile<kD>, true>(src, tile, V);
}

// dO rows [t0, t0 + len) of value head hv into a bf16 [64, 128] tile (Tile), zero past len and V:
// 1024 / kThreads groups of eight columns per thread, all loads issued before the first store. `native`: dO has
// q's dtype T; `vec`: its rows also allow 16-byte loads (bwd::rows_vectorisable).
template <typename T, int kThreads>
__device__ __forceinline__ void load_d_o_tile(const ChunkParams& p, const ChunkRef& ch, int hv,
                                              bool native, bool vec, bf16* tile) {
  constexpr int kPerRow = kD / 8, kGroups = kC * kPerRow / kThreads;
  const BackwardParams& b = p.bwd;
  const int64_t base = ch.batch * b.d_o_s[0] + ch.t0 * b.d_o_s[1] + hv * b.d_o_s[2];
  uint4 x[kGroups];
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int i = threadIdx.x + j * kThreads, r = i / kPerRow, c = (i % kPerRow) * 8;
    const int valid = r < ch.len ? min(max(p.head_v_dim - c, 0), 8) : 0;
    const int64_t at = base + r * b.d_o_s[1] + c * b.d_o_s[3];
    x[j] = valid == 0 ? make_uint4(0u, 0u, 0u, 0u)
           : native   ? bwd::load8_bf16<T>(static_cast<const T*>(b.d_o) + at, b.d_o_s[3], valid, vec)
                      : bwd::load8_bf16_any(b.d_o, b.d_o_dtype, at, b.d_o_s[3], valid);
  }
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const int i = threadIdx.x + j * kThreads;
    *reinterpret_cast<uint4*>(tile + Tile::at(i / kPerRow, (i % kPerRow) * 8)) = x[j];
  }
}

// A product's epilogue has added up, per thread, a row quantity over its columns for rows
// 16 (w % 4) + g (lo) and that + 8 (hi): sums the four lanes of each row (fixed butterfly) and
// stores the warp's partial, part[w / 4][row] (w / 4: the warp's column group).
template <int kColGroups>
__device__ __forceinline__ void store_row_parts(float lo, float hi, float (&part)[kColGroups][kC]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lo += __shfl_xor_sync(0xffffffffu, lo, off);
    hi += __shfl_xor_sync(0xffffffffu, hi, off);
  }
  if ((lane & 3) == 0) {
    const int row = (warp & 3) * 16 + (lane >> 2);
    part[warp >> 2][row] = lo;
    part[warp >> 2][row + 8] = hi;
  }
}

// A 64-column product's epilogue (one block per warp: bwd::GemmLayout for N = 64) holds x, its
// element-wise results, for rows 16 (w % 4) + g and + 8, columns col + 8 nt + 0..1: sums each
// column over the warp's 16 rows (fixed butterfly over g) and stores part[w % 4][column], the
// warp's band's share. Every lane of the warp calls it.
template <int NT>
__device__ __forceinline__ void store_col_parts(int col, const float (&x)[NT][4],
                                                float (&part)[4][kC]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float c0 = x[nt][0] + x[nt][2], c1 = x[nt][1] + x[nt][3];
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      c0 += __shfl_xor_sync(0xffffffffu, c0, off);
      c1 += __shfl_xor_sync(0xffffffffu, c1, off);
    }
    if (lane < 4) {  // g = 0: col is this lane's own, n0 + 2 lane
      part[warp & 3][col + 8 * nt] = c0;
      part[warp & 3][col + 8 * nt + 1] = c1;
    }
  }
}

// A product's epilogue: adds the thread's share of the row dots acc_r . x_r (x a bf16 [64, 128]
// tile in shared memory; acc at gemm_apply's positions) for rows row (lo) and row + 8 (hi).
template <typename Acc>
__device__ __forceinline__ void add_row_dots(const Acc& acc, const bf16* x, int row, int col,
                                             float& lo, float& hi) {
#pragma unroll
  for (int nt = 0; nt < bwd::kTilesOf<Acc>; ++nt) {
    const int c = col + 8 * nt;
    const float2 x_lo =
        __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + Tile::at(row, c)));
    const float2 x_hi =
        __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + Tile::at(row + 8, c)));
    lo += acc[nt][0] * x_lo.x + acc[nt][1] * x_lo.y;
    hi += acc[nt][2] * x_hi.x + acc[nt][3] * x_hi.y;
  }
}

// Column i's sum: its four bands' partials in band order (deterministic).
__device__ __forceinline__ float band_sum(const float (&part)[4][kC], int i) {
  return ((part[0][i] + part[1][i]) + part[2][i]) + part[3][i];
}

// The whole of row i's dot: its column groups' partials in group order (deterministic).
template <int kColGroups>
__device__ __forceinline__ float row_part_sum(const float (&part)[kColGroups][kC], int i) {
  float sum = part[0][i];
#pragma unroll
  for (int c = 1; c < kColGroups; ++c) sum += part[c][i];
  return sum;
}

// Starts copying rows [t0, t0 + len) of head h of a bf16 [B, T, H, D] tensor (strides s) into a
// bf16 [64, 128] tile (Tile) by cp.async, zero-filled past len and D: for rows that allow 16-byte
// reads (bwd::rows_vectorisable: D a multiple of 8), so that dO and v stream in behind other work
// instead of stalling the block at their first use. Commit and wait are the caller's.
template <int kThreads>
__device__ __forceinline__ void copy_rows_async(const bf16* base, const int64_t* s,
                                                const ChunkRef& ch, int h, int D, bf16* tile) {
  constexpr int kPerRow = kD / 8;
  const bf16* src = base + ch.batch * s[0] + ch.t0 * s[1] + h * s[2];
  for (int i = threadIdx.x; i < kC * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * 8;
    const bool valid = r < ch.len && c < D;
    cp_async_16_or_zero(tile + Tile::at(r, c), valid ? src + r * s[1] + c : src, valid);
  }
}

// dO of value head hv by copy_rows_async (bf16 dO with 16-byte rows only).
template <int kThreads>
__device__ __forceinline__ void copy_d_o_async(const ChunkParams& p, const ChunkRef& ch, int hv,
                                               bf16* tile) {
  copy_rows_async<kThreads>(static_cast<const bf16*>(p.bwd.d_o), p.bwd.d_o_s, ch, hv,
                            p.head_v_dim, tile);
}

// The gates of value head hv (gamma and beta, fp32, from the intra pass) into `gates` by warp 0's
// cp.async: started a head ahead with the head's tiles, moved into place by warp 0 itself at the
// head's start (no block barrier of their own). Loading and scanning g and beta there instead
// kept the other 15 warps at the head's first barrier for 8% of this kernel's stall samples (H100,
// 1 x 32768). Commit and wait are the caller's.
__device__ __forceinline__ void copy_gates_async(const ChunkParams& p, int64_t slot, int hv,
                                                 float (&gates)[2][kC]) {
  const int lane = threadIdx.x;
  if (lane >= 32) return;
  const size_t at = ws_index(p, slot, hv, kC) + 4 * (lane % 16);
  cp_async_16(&gates[lane / 16][4 * (lane % 16)], (lane < 16 ? p.ws.gamma : p.ws.beta) + at);
}

// Two results of a 2-byte dtype T at one 4-byte place of a bf16 tile (the tile as staging).
template <typename T>
__device__ __forceinline__ void stage_pair(bf16* at, float x0, float x1) {
  static_assert(sizeof(T) == 2, "2-byte results");
  const T pair[2] = {from_f32<T>(x0), from_f32<T>(x1)};
  *reinterpret_cast<uint32_t*>(at) = *reinterpret_cast<const uint32_t*>(pair);
}

// Starts copying the key head's normalised K and Q tiles and their rows' inverse norms (where
// use_qk_l2norm), as the intra pass stored them: bitwise what load_tile makes of k and q, without
// the block's waiting on the loads. Issued a whole item ahead of use (at the previous item's end:
// the tiles are read until then), so that they land behind the first value head's Vn product
// rather than in front of it. Commit and wait are the caller's.
template <int kThreads, typename Smem>
__device__ __forceinline__ void copy_key_tiles_async(const ChunkParams& p, int64_t slot, int hk,
                                                     Smem& sm) {
  const size_t key = ws_key_index(p, slot, hk, kC * kD);
  copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.qn + key, sm.q);
  copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.kn + key, sm.k);
  if (p.l2norm && threadIdx.x < 32) {  // 16 pieces of 4 rows each
    const int i = threadIdx.x % 16;
    const size_t at = ws_key_index(p, slot, hk, kC) + 4 * i;
    if (threadIdx.x < 16) cp_async_16(sm.q_inv + 4 * i, p.ws.q_inv + at);
    else cp_async_16(sm.k_inv + 4 * i, p.ws.k_inv + at);
  }
}

// dx of one tensor (q or k, key head h) from dy, its sum over the value heads, held in registers
// in the products' layout (bwd::RegTile: rows 16 (w % 4) + lane / 4 and + 8, columns
// 32 (w / 4) + 8 nt + 2 (lane % 4) + 0..1), through the l2norm when it was applied:
// dx = inv (dy - y (y . dy)), with y the normalised row as the products took it (the bf16 tile,
// times 1 / mul: q's tile is scaled) and inv = 1 / |x| from load_tile, as FLA's l2norm backward
// takes y in the input's dtype. Steps between block barriers: key_grad_dots leaves each warp's
// share of the row dots y . dy in `part` (per column group, store_row_parts); store_key_grad
// finishes the rows and, for a 2-byte dtype, writes them over the tile in that dtype (each
// thread at the positions it alone read y from), which copy_rows_out then stores as whole
// rows (16-byte pieces); an fp32 dx is stored from the registers. (Every dtype stored straight
// from the registers, 8 rows of 4 bytes an instruction, took this kernel to 2636 us against
// 2405 so: H100, 1 x 32768. Through an fp32 tile, a row per warp, as before session 15, it took
// 32 KB of shared memory. Reading x again instead of the tile, scalar loads at the item's end
// that the next head's prefetches had queued behind, took 16.6% of the stall samples.)
// mul (q's scale) is positive; below FLT_MIN (absurd, but allowed) 1 / mul overflows and the tile
// holds denormals or zeros: y is taken as 0 there, the radial term dropped, not NaN.
__device__ __forceinline__ float unscale_of(float mul) { return mul >= FLT_MIN ? 1.f / mul : 0.f; }

template <int kThreads>
__device__ __forceinline__ void key_grad_dots(const bwd::RegTile<kThreads>& dy, const bf16* tile,
                                              float mul,
                                              float (&part)[GradShape<kThreads>::kColGroups][kC]) {
  using L = bwd::GemmLayout<kD, kThreads>;
  static_assert(L::kBlocks == 1, "one output block per warp");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row = (warp & 3) * 16 + (lane >> 2), col = (warp >> 2) * L::kWarpCols + 2 * (lane & 3);
  float lo = 0.f, hi = 0.f;
  add_row_dots(dy[0], tile, row, col, lo, hi);
  const float unscale = unscale_of(mul);
  store_row_parts(lo * unscale, hi * unscale, part);
}

template <typename T, int kThreads>
__device__ __forceinline__ void store_key_grad(
    const ChunkParams& p, const ChunkRef& ch, int h, const bwd::RegTile<kThreads>& dy,
    bf16* tile, const float* row_inv, float mul,
    const float (&part)[GradShape<kThreads>::kColGroups][kC], T* dx, const int64_t* dx_s) {
  constexpr bool kInTile = sizeof(T) == 2;
  using L = bwd::GemmLayout<kD, kThreads>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, K = p.head_k_dim;
  const int row = (warp & 3) * 16 + (lane >> 2), col = (warp >> 2) * L::kWarpCols + 2 * (lane & 3);
  const float unscale = unscale_of(mul);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {  // rows row, row + 8
    const int r = row + 8 * hh;
    if (r >= ch.len) continue;
    T* out = dx + ch.batch * dx_s[0] + (ch.t0 + r) * dx_s[1] + h * dx_s[2];
    const float ydot = p.l2norm ? row_part_sum(part, r) : 0.f;
    const float inv = p.l2norm ? row_inv[r] : 1.f;
#pragma unroll
    for (int nt = 0; nt < L::kTiles; ++nt) {
      const int c = col + 8 * nt;
      float g0 = dy[0][nt][2 * hh], g1 = dy[0][nt][2 * hh + 1];
      if (p.l2norm) {
        const float2 y = unpack_bf16(*reinterpret_cast<const uint32_t*>(tile + Tile::at(r, c)));
        g0 = inv * (g0 - y.x * unscale * ydot);
        g1 = inv * (g1 - y.y * unscale * ydot);
      }
      if constexpr (kInTile) {
        stage_pair<T>(tile + Tile::at(r, c), g0, g1);
      } else {
        if (c < K) out[c * dx_s[3]] = from_f32<T>(g0);
        if (c + 1 < K) out[(c + 1) * dx_s[3]] = from_f32<T>(g1);
      }
    }
  }
}

// Rows [0, len) and columns [0, D) of a 2-byte-T result left in a bf16 [64, 128] tile (Tile) to
// head h of a [B, T, H, D] tensor: 16-byte pieces where its rows allow (bwd::rows_vectorisable),
// else element by element. Thread t takes the pieces that copy_tile_async<kThreads, kC, kD, kD>
// gives it, so a copy into the tile issued after this by the same threads needs no barrier.
// (Why through a tile at all: store_key_grad's note.)
template <typename T, int kThreads>
__device__ __forceinline__ void copy_rows_out(const ChunkRef& ch, int h, int D, const bf16* tile,
                                              T* x, const int64_t* s) {
  constexpr int kPerRow = kD / 8;
  const bool vec = bwd::rows_vectorisable<T>(x, s, D);
  T* const base = x + ch.batch * s[0] + ch.t0 * s[1] + h * s[2];
  for (int i = threadIdx.x; i < kC * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * 8;
    if (r >= ch.len || c >= D) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(tile + Tile::at(r, c));
    T* const out = base + r * s[1];
    if (vec) {
      *reinterpret_cast<uint4*>(out + c) = v;
    } else {
      const T* e = reinterpret_cast<const T*>(&v);
      for (int j = 0; j < 8 && c + j < D; ++j) out[(c + j) * s[3]] = e[j];
    }
  }
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads, 1)
    grads_kernel(const ChunkParams p, bool d_o_native, bool d_o_vec, bool v_vec) {
  constexpr int kWarps = GradShape<kThreads>::kWarps;
  using RegTile = bwd::RegTile<kThreads>;
  // bf16 dO with 16-byte rows streams in by cp.async (a later head's behind the previous head's
  // work); otherwise the block loads and converts it at the head's start. Likewise bf16 v with
  // 16-byte rows streams in behind dW (else the block loads it after dW).
  constexpr bool kBf16 = std::is_same<T, bf16>::value;
  constexpr bool kStagedDv = sizeof(T) == 2;  // dv through a tile (dVb's epilogue)
  const bool d_o_async = kBf16 && d_o_native && d_o_vec;
  const bool v_async = kBf16 && v_vec;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  GradSmem<kThreads>& sm = *reinterpret_cast<GradSmem<kThreads>*>(tile_smem_base<true>(smem_raw));
  const BackwardParams& b = p.bwd;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const float* const f = sm.f;  // K K^T, [64, kLdCf]
  auto add_to = [](RegTile& sum, auto row_mul) {
    return [&sum, row_mul](int blk, int row, int, const auto& acc) {
      bwd::add_rows(sum, blk, row, acc, row_mul);
    };
  };

  // The persistent loop over the block's items: the current one in sm.item[0], the next in
  // sm.item[1], read where used (fixed shared addresses: no registers held across the products for
  // them); thread 0 advances both between two barriers at an item's end.
  const GradItem& cur = sm.item[0];
  const GradItem& next_item = sm.item[1];
  const int64_t& slot = cur.slot;
  const int& hk = cur.hk;
  const ChunkRef& ch = cur.ch;
  if (tid == 0) {
    const GradItem first = live_item_from(p, blockIdx.x);
    sm.item[0] = first;
    sm.item[1] = live_item_from(p, first.index + gridDim.x);
  }
  __syncthreads();
  if (cur.slot < 0) return;
  {  // ---- the first item's first value head: its workspace tiles (and bf16 dO) by cp.async, in
     // flight while the block loads q and k (every later head's, the next item's first included,
     // are started during the previous head, as soon as their buffers are free: below).
    const int hv = hk * p.group;
    const size_t tile = ws_index(p, slot, hv, kC * kD);
    const size_t small = ws_index(p, slot, hv, kC * kC);
    const size_t state = ws_index(p, slot, hv, kD * kD);
    copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.w + tile, sm.w_dw);
    copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.u + tile, sm.u_vn);
    copy_tile_async<kThreads, kC, kC, kC, Tile>(p.ws.m + small, sm.m);
    copy_tile_async<kThreads, kC, kC, kC, Tile>(p.ws.t + small, sm.t);
    copy_state_async<kThreads>(b.states + state, V, sm.st);
    copy_state_async<kThreads>(b.dstates + state, V, sm.dst);
    if (d_o_async) copy_d_o_async<kThreads>(p, ch, hv, sm.dov);
    copy_gates_async(p, slot, hv, sm.next_gates);
    cp_async_commit();
    copy_key_tiles_async<kThreads>(p, slot, hk, sm);  // its own group: waited for after Vn
    cp_async_commit();
  }
  for (bool more = true; more;) {
    // dL/d(normalised q), dL/d(normalised k), summed over the value heads in registers, in the
    // products' layout (bwd::RegTile): the products add into them straight from their accumulators.
    RegTile dq_sum = {}, dk_sum = {};

    for (int rep = 0; rep < p.group; ++rep) {
      __syncthreads();  // the previous value head is done with every tile; the items are published
      const int hv = hk * p.group + rep;
      // Whether a value head follows (this key head's next, or the next item's first):
      // block-uniform.
      const bool has_next = rep + 1 < p.group || next_item.slot >= 0;

      // ---- loads: the workspace tiles (and bf16 dO) are in flight (above, or started during the
      // previous head), and at the first head the key head's q and k tiles, in the most recent
      // group (waited for after Vn); dO of other layouts is loaded by the block.
      if (warp == 0) {  // the gates, copied a head ahead by this warp; e_i = exp(gamma_i),
                        // r_i = exp(gamma_last - gamma_i); published by the barrier below
        if (rep == 0) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncwarp();
        for (int i = lane; i < kC; i += 32) {
          sm.gamma[i] = sm.next_gates[0][i];
          sm.beta[i] = sm.next_gates[1][i];
        }
        __syncwarp();
        const float last = sm.gamma[kC - 1];
        for (int i = lane; i < kC; i += 32) {
          sm.e[i] = __expf(sm.gamma[i]);
          sm.r[i] = __expf(last - sm.gamma[i]);
        }
      }
      if (!d_o_async) load_d_o_tile<T, kThreads>(p, ch, hv, d_o_native, d_o_vec, sm.dov);
      if (rep == 0) cp_async_wait<1>();
      else cp_async_wait<0>();
      publish_tiles();
      const float e_last = __expf(sm.gamma[kC - 1]);
      // S' = e_last S + ...: d e_last = S . dS' (fixed per-thread pattern, warp sums, then the
      // warps in order at the end).
      {
        float acc = 0.f;
        // Eight elements (16 bytes) at a time, at the same places of the two tiles (one layout).
        for (int i = tid; i < kD * kD / 8; i += kThreads) {
          const uint4 sv = reinterpret_cast<const uint4*>(sm.st)[i];
          const uint4 dv = reinterpret_cast<const uint4*>(sm.dst)[i];
          const __nv_bfloat162* s2 = reinterpret_cast<const __nv_bfloat162*>(&sv);
          const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 a = __bfloat1622float2(s2[e]), b = __bfloat1622float2(d2[e]);
            acc += a.x * b.x;
            acc += a.y * b.y;
          }
        }
        acc = warp_sum(acc);
        if (lane == 0) sm.red[warp] = acc;  // summed in warp order at the end
      }

      // ---- Vn = U - W S   (B(k, v) = S^T[v][k]: stored transposed), over U: each element of U
      // is read and replaced by the thread that holds its product (U is no operand).
      bwd::gemm_apply<kD, kD, false, true, kThreads>(
          sm.w_dw, sm.st, [&](int, int row, int col, const auto& acc) {
            bwd::for_each_pair(row, col, acc, [&](int r, int c, float x0, float x1) {
              uint32_t* at = reinterpret_cast<uint32_t*>(sm.u_vn + Tile::at(r, c));
              const float2 u = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(at));
              *at = pack_bf16(u.x - x0, u.y - x1);
            });
          });
      if (rep == 0) {  // the key head's q and k tiles have landed behind Vn's product
        cp_async_wait<0>();
        publish_tiles();
        // K K^T, the same for every value head of the key head, into f (fp32 [64, kLdCf]) once:
        // no other product of a value head goes through f (pairs chain in registers), and dA's
        // epilogue reads it in this product's layout (GemmLayout<kC>), each thread its own
        // positions.
        bwd::gemm_tile<kC, kD, false, true, kThreads>(sm.f, kLdCf, sm.k, sm.k);
      }

      // ---- dVn = diag(r) K dS' + M^T dO;  dr_i = (K dS')_i . Vn_i. The first product's epilogue
      // takes dr's partial dots (Vn at the thread's own positions: written by it just above) and
      // keeps diag(r) K dS' in registers, which the second starts from (gemm_apply_onto), with
      // no barrier between them: dVn has a buffer of its own.
      bwd::ChainTile<kD, kThreads> chain_d;
      {
        float dr_lo = 0.f, dr_hi = 0.f;
        bwd::gemm_apply<kD, kD, false, true, kThreads>(
            sm.k, sm.dst, [&](int, int row, int col, const auto& acc) {
              add_row_dots(acc, sm.u_vn, row, col, dr_lo, dr_hi);
              bwd::keep_scaled(chain_d, row, col, acc, [&](int r) { return sm.r[r]; },
                               [](int) { return 1.f; });
            });
        store_row_parts(dr_lo, dr_hi, sm.dr_part);
      }
      bwd::gemm_apply_onto<kD, kC, true, false, kThreads>(  // dVn, in bf16
          chain_d, sm.m, sm.dov, [&](int, int row, int col, const auto& acc) {
            bwd::store_bf16(sm.dvn, row, col, acc, 1.f);
          });
      publish_tiles();

      // ---- dM = dO Vn^T (causal part): gamma's share, rows(dM * M) - cols(dM * M), by row and
      // column parts from the epilogue; dM * Gamma over M (each element of M read and replaced by
      // the thread that holds its product; M is no operand).
      static_assert(bwd::GemmLayout<kC, kThreads>::kBlocks == 1, "one 64-column block per warp");
      bwd::gemm_apply<kC, kD, false, true, kThreads>(sm.dov, sm.u_vn,
          [&](int, int row, int col, const auto& acc) {
            constexpr int NT = bwd::kTilesOf<decltype(acc)>;
            float x[NT][4];  // dM * M
            float rows[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {  // rows row, row + 8
                const int r = row + 8 * h, c = col + 8 * nt;
                float dmg[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const float dm = acc[nt][2 * h + e];
                  const bool causal = c + e <= r;
                  x[nt][2 * h + e] = causal ? dm * __bfloat162float(sm.m[Tile::at(r, c) + e]) : 0.f;
                  dmg[e] = causal ? dm * __expf(sm.gamma[r] - sm.gamma[c + e]) : 0.f;
                  rows[h] += x[nt][2 * h + e];
                }
                *reinterpret_cast<uint32_t*>(sm.m + Tile::at(r, c)) = pack_bf16(dmg[0], dmg[1]);
              }
            }
            store_row_parts(rows[0], rows[1], sm.row_part_a);
            store_col_parts(col, x, sm.col_part);
          });

      // ---- dQ = diag(e) dO S^T + dMg K;  de_i = (dO S^T)_i . q_i   (B(v, k) = S^T[v][k]), the
      // same pattern as dVn's: de's partial dots in the first product's epilogue, diag(e) dO S^T
      // kept in registers for the second to start from.
      {
        float de_lo = 0.f, de_hi = 0.f;
        bwd::gemm_apply<kD, kD, false, false, kThreads>(
            sm.dov, sm.st, [&](int, int row, int col, const auto& acc) {
              add_row_dots(acc, sm.q, row, col, de_lo, de_hi);
              bwd::keep_scaled(chain_d, row, col, acc, [&](int r) { return sm.e[r]; },
                               [](int) { return 1.f; });
            });
        store_row_parts(de_lo, de_hi, sm.de_part);
      }
      publish_tiles();  // dMg (over M) and dM's row and column parts are complete; dO is read
      if (v_async) {  // v replaces dO, in flight behind dQ, dK and dW
        copy_rows_async<kThreads>(static_cast<const bf16*>(p.v), p.v_s, ch, hv, V, sm.dov);
        cp_async_commit();
      }
      if (tid < kC) sm.dgam[tid] = row_part_sum(sm.row_part_a, tid) - band_sum(sm.col_part, tid);
      bwd::gemm_apply_onto<kD, kC, false, false, kThreads>(
          chain_d, sm.m, sm.k, add_to(dq_sum, [&](int) { return p.scale; }));

      // ---- dK = dMg^T Q + diag(r) Vn dS'^T   (B(v, k) = dS'^T[v][k])
      bwd::gemm_apply<kD, kC, true, false, kThreads>(sm.m, sm.q,
                                                     add_to(dk_sum, [](int) { return 1.f; }));
      bwd::gemm_apply<kD, kD, false, false, kThreads>(
          sm.u_vn, sm.dst, add_to(dk_sum, [&](int r) { return sm.r[r]; }));

      // ---- dW = -dVn S^T, over W (done with since Vn: barriers since).
      bwd::gemm_apply<kD, kD, false, false, kThreads>(  // -dVn S^T, in bf16
          sm.dvn, sm.st, [&](int, int row, int col, const auto& acc) {
            bwd::store_bf16(sm.w_dw, row, col, acc, -1.f);
          });
      if (!v_async)
        load_tile<T, kThreads, Tile>(static_cast<const T*>(p.v), p.v_s, ch.batch, ch.t0,
                                     ch.len, hv, V, false, 1.f, nullptr, sm.dov);

      if (v_async) cp_async_wait<0>();
      publish_tiles();  // v is in dov, dW in w_dw; every warp is done with S^T and dS'^T
      if (has_next) {  // the next head's states stream in behind the rest of this head's work
        const HeadRef nh = next_head(p, next_item, slot, hv, ch, rep);
        const size_t next = ws_index(p, nh.slot, nh.hv, kD * kD);
        copy_state_async<kThreads>(b.states + next, V, sm.st);
        copy_state_async<kThreads>(b.dstates + next, V, sm.dst);
        cp_async_commit();
      }
      // ---- dT = (dW K^T) diag(b e) + (dVn V^T) diag(b): the column gates in the epilogues; the
      // first product's result stays in registers for the second to start from.
      bwd::ChainTile<kC, kThreads> chain_t;
      bwd::gemm_apply<kC, kD, false, true, kThreads>(
          sm.w_dw, sm.k, [&](int, int row, int col, const auto& acc) {
            bwd::keep_scaled(chain_t, row, col, acc, [](int) { return 1.f; },
                             [&](int c) { return sm.e[c]; });
          });
      bwd::gemm_apply_onto<kC, kD, false, true, kThreads>(
          chain_t, sm.dvn, sm.dov, [&](int, int row, int col, const auto& acc) {
            bwd::for_each_pair(row, col, acc, [&](int r, int c, float x0, float x1) {
              *reinterpret_cast<uint32_t*>(sm.x + Tile::at(r, c)) =
                  pack_bf16(x0 * sm.beta[c], x1 * sm.beta[c + 1]);
            });
          });
      publish_tiles();

      // ---- dVb = T^T dVn: dv = diag(b) dVb from the epilogue, dbeta_i = dVb_i . v_i by
      // column-group parts (applied with dA's row sums below). A 2-byte dv goes over Vn (its last
      // product, dK's, was before dW's barrier) and out as whole rows after dA's first barrier;
      // fp32 dv is stored from the registers.
      {
        T* dv = static_cast<T*>(b.dv) + ch.batch * b.dv_s[0] + ch.t0 * b.dv_s[1] + hv * b.dv_s[2];
        float dvb_lo = 0.f, dvb_hi = 0.f;
        bwd::gemm_apply<kD, kC, true, false, kThreads>(
            sm.t, sm.dvn, [&](int, int row, int col, const auto& acc) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {  // rows row, row + 8
                const int r = row + 8 * h;
                const float br = sm.beta[r];
                float dot = 0.f;
#pragma unroll
                for (int nt = 0; nt < bwd::kTilesOf<decltype(acc)>; ++nt) {
                  const int c = col + 8 * nt;
                  const float x0 = acc[nt][2 * h], x1 = acc[nt][2 * h + 1];
                  const float2 vv = __bfloat1622float2(
                      *reinterpret_cast<const __nv_bfloat162*>(sm.dov + Tile::at(r, c)));
                  dot += x0 * vv.x + x1 * vv.y;
                  if constexpr (kStagedDv) {
                    stage_pair<T>(sm.u_vn + Tile::at(r, c), br * x0, br * x1);
                  } else if (r < ch.len) {
                    if (c < V) dv[r * b.dv_s[1] + c * b.dv_s[3]] = from_f32<T>(br * x0);
                    if (c + 1 < V) dv[r * b.dv_s[1] + (c + 1) * b.dv_s[3]] = from_f32<T>(br * x1);
                  }
                }
                (h == 0 ? dvb_lo : dvb_hi) += dot;
              }
            });
        store_row_parts(dvb_lo, dvb_hi, sm.dvb_part);
      }

      // ---- dKb = T^T dW: dk += diag(b e) dKb; dbeta += e dKb.k, de += b dKb.k (the dots' parts
      // applied with dA's row sums below), all in the epilogue.
      {
        float dkb_lo = 0.f, dkb_hi = 0.f;
        bwd::gemm_apply<kD, kC, true, false, kThreads>(sm.t, sm.w_dw,
            [&](int blk, int row, int col, const auto& acc) {
#pragma unroll
              for (int nt = 0; nt < bwd::kTilesOf<decltype(acc)>; ++nt) {
                const int c = col + 8 * nt;
                const float2 k_lo = __bfloat1622float2(
                    *reinterpret_cast<const __nv_bfloat162*>(sm.k + Tile::at(row, c)));
                const float2 k_hi = __bfloat1622float2(
                    *reinterpret_cast<const __nv_bfloat162*>(sm.k + Tile::at(row + 8, c)));
                dkb_lo += acc[nt][0] * k_lo.x + acc[nt][1] * k_lo.y;
                dkb_hi += acc[nt][2] * k_hi.x + acc[nt][3] * k_hi.y;
              }
              bwd::add_rows(dk_sum, blk, row, acc, [&](int r) { return sm.beta[r] * sm.e[r]; });
            });
        store_row_parts(dkb_lo, dkb_hi, sm.dkb_part);
      }

      // ---- dA = -T^T dT T^T (strictly lower), with KKg = Gamma * K K^T beside it. T^T dT goes to
      // bf16 over dMg (done with); the second product's epilogue does the element-wise part on its
      // registers (K K^T at the same positions of f, made once for all the value heads):
      // A_ij = b_i Gamma_ij k_i.k_j: rows(dA * KKg) (beta's share) and rows - cols of dA * A
      // (gamma's share) by parts, x <- dA b_i Gamma_ij (the gradient of k_i.k_j).
      bwd::gemm_apply<kC, kC, true, false, kThreads>(
          sm.t, sm.x, [&](int, int row, int col, const auto& acc) {
            bwd::store_bf16(sm.m, row, col, acc, 1.f);
          });
      publish_tiles();
      if constexpr (kStagedDv)  // before U's copy over it: each thread its own pieces
        copy_rows_out<T, kThreads>(ch, hv, V, sm.u_vn, static_cast<T*>(b.dv), b.dv_s);
      if (has_next) {  // dVn, dW (dKb was their last product) and v are done with
        const HeadRef nh = next_head(p, next_item, slot, hv, ch, rep);
        const size_t next = ws_index(p, nh.slot, nh.hv, kC * kD);
        copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.w + next, sm.w_dw);
        copy_tile_async<kThreads, kC, kD, kD, Tile>(p.ws.u + next, sm.u_vn);
        if (d_o_async) copy_d_o_async<kThreads>(p, nh.ch, nh.hv, sm.dov);
        copy_gates_async(p, nh.slot, nh.hv, sm.next_gates);  // read at this head's start
        cp_async_commit();
      }
      bwd::gemm_apply<kC, kC, false, true, kThreads>(
          sm.m, sm.t, [&](int, int row, int col, const auto& acc) {
            constexpr int NT = bwd::kTilesOf<decltype(acc)>;
            float dga[NT][4];  // dA * A
            float db_rows[2] = {0.f, 0.f}, dg_rows[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {  // rows row, row + 8
                const int r = row + 8 * h, c = col + 8 * nt;
                float dkk[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  float db = 0.f, dg = 0.f;
                  dkk[e] = 0.f;
                  if (c + e < r) {
                    const float gate = __expf(sm.gamma[r] - sm.gamma[c + e]);
                    const float da = -acc[nt][2 * h + e];
                    const float kkg = gate * f[r * kLdCf + c + e];
                    db = da * kkg;
                    dg = db * sm.beta[r];
                    dkk[e] = da * sm.beta[r] * gate;
                  }
                  dga[nt][2 * h + e] = dg;
                  db_rows[h] += db;
                  dg_rows[h] += dg;
                }
                *reinterpret_cast<uint32_t*>(sm.x + Tile::at(r, c)) = pack_bf16(dkk[0], dkk[1]);
              }
            }
            store_row_parts(db_rows[0], db_rows[1], sm.row_part_a);
            store_row_parts(dg_rows[0], dg_rows[1], sm.row_part_b);
            store_col_parts(col, dga, sm.col_part);
          });
      publish_tiles();
      if (has_next) {  // M (now T^T dT) and T are done with
        const HeadRef nh = next_head(p, next_item, slot, hv, ch, rep);
        const size_t next = ws_index(p, nh.slot, nh.hv, kC * kC);
        copy_tile_async<kThreads, kC, kC, kC, Tile>(p.ws.m + next, sm.m);
        copy_tile_async<kThreads, kC, kC, kC, Tile>(p.ws.t + next, sm.t);
        cp_async_commit();
      }
      // The row sums of this head: dbeta, and dgamma before its reverse cumsum (e_i = exp(gamma_i),
      // r_i = exp(gamma_last - gamma_i): de and dr enter as e de - r dr). Thread i alone reads and
      // writes row i here (the cumsum below reads them after a barrier).
      if (tid < kC) {
        const int i = tid;
        const float db = row_part_sum(sm.row_part_a, i);
        const float dg = row_part_sum(sm.row_part_b, i) - band_sum(sm.col_part, i);
        const float dkb_k = row_part_sum(sm.dkb_part, i);
        const float dvb_v = row_part_sum(sm.dvb_part, i);
        const float de = row_part_sum(sm.de_part, i) + sm.beta[i] * dkb_k;
        const float dr = row_part_sum(sm.dr_part, i);
        sm.dbeta[i] = (dvb_v + sm.e[i] * dkb_k) + db;
        sm.dr[i] = dr;
        sm.dgam[i] = (sm.dgam[i] + dg) + (de * sm.e[i] - dr * sm.r[i]);
      }

      // ---- dk += dA K + dA^T K
      bwd::gemm_apply<kD, kC, false, false, kThreads>(sm.x, sm.k,
                                                      add_to(dk_sum, [](int) { return 1.f; }));
      bwd::gemm_apply<kD, kC, true, false, kThreads>(sm.x, sm.k,
                                                     add_to(dk_sum, [](int) { return 1.f; }));

      // ---- dg = reverse cumsum of dgamma, the last row also taking e_last's and sum r dr's shares
      __syncthreads();
      if (warp == 0) {  // lane l holds rows 2 l, 2 l + 1; fixed shuffle orders throughout
        float de_last = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) de_last += sm.red[w];
        const float dlast =
            de_last * e_last +
            warp_sum(sm.dr[2 * lane] * sm.r[2 * lane] + sm.dr[2 * lane + 1] * sm.r[2 * lane + 1]);
        const float x0 = sm.dgam[2 * lane];
        const float x1 = sm.dgam[2 * lane + 1] + (lane == 31 ? dlast : 0.f);
        float suffix = x0 + x1;  // inclusive suffix sum over the lanes' pairs
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const float y = __shfl_down_sync(0xffffffffu, suffix, off);
          if (lane + off < 32) suffix += y;
        }
        float after = __shfl_down_sync(0xffffffffu, suffix, 1);  // rows past 2 l + 1
        if (lane == 31) after = 0.f;
        const float d1 = x1 + after;
        sm.dgam[2 * lane + 1] = d1;
        sm.dgam[2 * lane] = x0 + d1;
      }
      __syncthreads();
      if (tid < ch.len) {
        const int64_t row = ch.batch * b.dg_s[0] + (ch.t0 + tid) * b.dg_s[1] + hv * b.dg_s[2];
        store_float(b.dg, b.dg_dtype, row, sm.dgam[tid]);
        const int64_t brow =
            ch.batch * b.dbeta_s[0] + (ch.t0 + tid) * b.dbeta_s[1] + hv * b.dbeta_s[2];
        store_float(b.dbeta, b.dbeta_dtype, brow, sm.dbeta[tid]);
      }
    }

    // ---- dq, dk of the key head: through the l2norm, in q's dtype, from the registers. The
    // row parts reuse dr's and de's (last read before the last head's final barriers).
    if (p.l2norm) {
      key_grad_dots<kThreads>(dq_sum, sm.q, p.scale, sm.dr_part);
      key_grad_dots<kThreads>(dk_sum, sm.k, 1.f, sm.de_part);
    }
    __syncthreads();
    store_key_grad<T, kThreads>(p, ch, hk, dq_sum, sm.q, sm.q_inv, p.scale, sm.dr_part,
                                static_cast<T*>(b.dq), b.dq_s);
    store_key_grad<T, kThreads>(p, ch, hk, dk_sum, sm.k, sm.k_inv, 1.f, sm.de_part,
                                static_cast<T*>(b.dk), b.dk_s);
    if constexpr (sizeof(T) == 2) {
      __syncthreads();
      copy_rows_out<T, kThreads>(ch, hk, K, sm.q, static_cast<T*>(b.dq), b.dq_s);
      copy_rows_out<T, kThreads>(ch, hk, K, sm.k, static_cast<T*>(b.dk), b.dk_s);
    }
    more = next_item.slot >= 0;
    const int64_t next_slot = next_item.slot;
    const int next_hk = next_item.hk;
    __syncthreads();  // every thread is done reading the two items and the q, k tiles
    if (more) {  // the next item's q and k, in a group of their own (the most recent)
      copy_key_tiles_async<kThreads>(p, next_slot, next_hk, sm);
      cp_async_commit();
    }
    if (more && tid == 0) {  // published by the next item's first barrier
      const GradItem next = sm.item[1];
      sm.item[0] = next;
      sm.item[1] = live_item_from(p, next.index + gridDim.x);
    }
  }
}

template <typename T, int kThreads>
void launch_shape(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(GradSmem<kThreads>) + 1024;  // + the shift to a 1 KB boundary
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(grads_kernel<T, kThreads>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  // Persistent: as many blocks as the device holds at once (one per SM), each walking its items.
  const long long items = static_cast<long long>(p.num_slots) * p.num_heads;
  const long long resident =
      resident_blocks(reinterpret_cast<const void*>(grads_kernel<T, kThreads>), kThreads, smem);
  const dim3 grid(static_cast<unsigned>(items < resident ? items : resident));
  const bool native = p.bwd.d_o_dtype == p.dtype;
  const bool vec = native && bwd::rows_vectorisable<T>(p.bwd.d_o, p.bwd.d_o_s, p.head_v_dim);
  const bool v_vec = bwd::rows_vectorisable<T>(p.v, p.v_s, p.head_v_dim);
  grads_kernel<T, kThreads><<<grid, kThreads, smem, stream>>>(p, native, vec, v_vec);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

constexpr int kGradThreads = 512;

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  launch_shape<T, kGradThreads>(p, stream);
}

}  // namespace

void check_grads_device() {
  const int optin = device_info().max_smem_per_block_optin;
  const size_t grads = sizeof(GradSmem<kGradThreads>) + 1024;
  const size_t need = grads > dstate_smem_bytes() ? grads : dstate_smem_bytes();
  if (static_cast<size_t>(optin) < need)
    fail(Error::Kind::kNotImplemented, "chunk_gated_delta_rule: the CUDA backward needs ", need,
         " bytes of shared memory per block (Hopper); this device offers ", optin);
}

void launch_grads(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
