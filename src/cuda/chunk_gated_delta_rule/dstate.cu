// Chunked gated delta rule, CUDA backward, the reverse state pass: the gradient dS of the state,
// carried backwards through the chunks (launch.cu, above backward(), has the whole picture).
//
// Per chunk, last to first, with W, M, gamma (per value head) and K, Q (per key head) from the
// intra pass and dO from the caller (the CPU kernel's "dS_in" line: S' = e_last S + KR^T Vn,
// O = Qe S + M Vn, Vn = U - W S differentiated with respect to S, where KR = diag(exp(gamma_last
// - gamma)) K and Qe = diag(e^gamma) Q):
//   store dS^T (bf16): the gradient of the state leaving this chunk, for the gradient kernel
//   (tiles.cuh's store_state_slice: on sm_90 in the wide shape by stmatrix and a TMA store per
//   warp, as the forward's state pass stores S^T; else 4-byte stores from the registers)
//   dVn^T = (dS^T K^T) diag(exp(gamma_last - gamma)) + dO^T M        [v, t]
//   dS^T <- e_last dS^T + (dO^T diag(e^gamma)) Q - dVn^T W           [v, k]
// The gates go on the registers, as in the forward's state pass: on dS^T K^T's accumulator
// columns, and on dO's rows as they are stored to shared memory (a second, gated copy, which
// the product with Q takes its A fragments from), so K and Q are read once per key head rather
// than gated per value head. The rows' gates are loaded with dO, a chunk ahead: off the chain.
// (Gating dO^T's A fragments in registers after the barrier put 16 unpack-multiply-repacks a
// warp and chunk on the chain of the 32-column shape: 1 x 32768, 1766 against 1600 us.)
// Column v of dS depends only on column v of dS' and dO, so column tiles of V are independent
// blocks: (sequence, value head, V tile). The chain of dependent products per chunk is what bounds
// this pass, so each block splits it over 8 warps in kRowGroups x kSplit: row group r owns rows
// v = 16 r .. 16 r + 15 of the tile, and its warp s keeps slice s of k's kSplit of dS^T in
// mma.sync accumulators (16 x 128 / kSplit) and computes dVn^T for slice s of the chunk's tokens
// (as state.cu splits the forward). Two shapes:
//   64-column tiles, 4 row groups x 2 (k and tokens in halves)     where B * HV * 2 blocks
//                                                                   fill the SMs
//   32-column tiles, 2 row groups x 4 (k and tokens in quarters)   where they would fill at most
//                                                                   half of them (B * HV small,
//                                                                   as the forward's state pass
//                                                                   chooses): twice the blocks
// (FLASHDELTA_GDN_DSTATE_SHAPE=wide|narrow forces one: the bits do not depend on it, see below.)
// Per chunk, warp s:
//   1. gathers dS^T's bf16 A fragments over all of k: its own k16 blocks from its registers, the
//      group's other warps' from shared memory (stored there at the end of the previous chunk)
//   2. dVn^T over its tokens: dS^T K^T (K = 128), gated, + dO^T M (the causal M: t blocks from
//      its own)
//   3. gives dVn^T (negated, bf16 A fragments) to the group; meanwhile (no dependency on dVn^T)
//      dS^T[:, k slice] <- e_last dS^T + (gated dO^T) Q[:, k slice], which covers the wait at
//      the group's named barrier
//   4. dS^T[:, k slice] -= dVn^T W[:, k slice] over all 64 tokens (the group's dVn^T blocks)
//   5. its dS^T k16 blocks, packed to bf16, out to the group for the next chunk.
// Counting (m16n8k16 mma per 16 columns and chunk): dS K^T 64, dO M 20 (the causal blocks),
// dO Q 64, dVn W 64: 212, against 224 before. What crosses between warps is bf16 operands: per warp
// and chunk 2 KB (halves) or 3 KB (quarters) of dS^T fragments and 0.5 or 1.5 KB of dVn^T read
// from shared memory. The previous version split the contraction over k instead, so the warps
// of a group exchanged fp32 partial sums of dVn^T [16 x 64]: 4 KB written and 4 (halves) or
// 12 KB (quarters) read per warp and chunk, on the chain after the barrier, and dO M's full
// square (32 mma). Each dVn^T element is now one accumulation chain over k (the k16 blocks in
// order) and then the t blocks of dO M, in the same order in every shape: no cross-warp sums,
// so the bits do not depend on the shape (or the run).
// Streaming: W, K, Q, M, gamma of chunk c - 1 are copied into the other half of a double buffer
// while chunk c is computed (on sm_90 W, K, Q, M by TMA into swizzled tiles, as state.cu does:
// H100, us, cp.async -> TMA: 1 x 32768 1234 -> 935, 8 x 4096 969 -> 858, 1 x 8192 317 -> 235;
// FLASHDELTA_GDN_TMA_TILES=0 forces cp.async), and so is dO of chunk c - 1 (by cp.async) when
// it is bf16 with 16-byte rows; the gamma of the thread's dO rows and the chunk's gamma_last come
// by 4-byte cp.async into per-thread slots, and the thread gates its dO rows at the top of the
// next step. dO of other
// dtypes or layouts is loaded into registers a chunk ahead instead and converted to bf16; but
// ptxas may sink such loads to their first use (it did: ncu put 25% of this kernel's stall
// samples, H100 1 x 32768, on the first use of a register loaded from dO, with nothing between
// the load and the use), which cp.async rules out. One block barrier per chunk (it both
// publishes chunk c's tiles and the group's dS^T fragments, and retires the buffers of chunk
// c + 1), one row-group barrier.
// Shared memory: ~181 KB with 64-column tiles, ~153 KB with 32 (Hopper; the backward's gradient
// kernel needs Hopper's shared memory anyway, check_grads_device()).
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/check.h"
#include "cuda/cp_async.cuh"
#include "cuda/chunk_gated_delta_rule/bwd_frag.cuh"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/state_pass.cuh"
#include "cuda/chunk_gated_delta_rule/tiles.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

// kRowGroups x kSplit = 8 warps; the tile is 16 kRowGroups state columns (value dims) wide.
template <int kRowGroups, int kSplit>
struct Shape {
  static constexpr int kWarps = kRowGroups * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kVT = 16 * kRowGroups;           // state columns (value dims) per block
  static constexpr int kLdO = kVT + 8;                  // 16-byte row padding
  static constexpr int kGroupsPerRow = kVT / 8;         // 8-element dO groups per row
  static constexpr int kGroupsPerThread = kC * kGroupsPerRow / kThreads;
  static constexpr int kKSlice = kD / kSplit;           // k per warp: dS^T columns
  static constexpr int kNT = kKSlice / 8;               // its n8 tiles
  static constexpr int kTW = kC / kSplit;               // tokens t per warp (of dVn^T)
  static constexpr int kTB = kTW / 16;                  // their k16 blocks
  static constexpr int kTN = kTW / 8;                   // their n8 tiles
  static constexpr int kKB = kKSlice / 16;              // k16 blocks of the warp's dS^T slice
  static_assert(kWarps == 8, "dstate blocks are 8 warps");
  static_assert(kSplit == 2 || kSplit == 4, "k split in halves or quarters");
  static_assert(kGroupsPerThread * kThreads == kC * kGroupsPerRow, "dO tile split evenly");
};

// kTma: W, K, Q, M come by TMA into swizzled 1 KB-aligned tiles without padding (tiles.cuh);
// the struct then starts 1024-byte aligned.
template <int kRowGroups, int kSplit, bool kTma>
struct DStateSmem {
  using S = Shape<kRowGroups, kSplit>;
  static constexpr int kLdT = kTma ? kD : kLdD;  // row strides of the tiles W, K, Q
  static constexpr int kLdM = kTma ? kC : kLdC;  // and M
  bf16 w[2][kC * kLdT];
  bf16 k[2][kC * kLdT];  // of the key head
  bf16 q[2][kC * kLdT];
  bf16 m[2][kC * kLdM];
  float gamma[2][kC];
  bf16 d_o[2][kC * S::kLdO];          // dO rows t, columns v of this tile
  bf16 d_og[2][kC * S::kLdO];         // the same rows times e^gamma_t
  // Per thread, by cp.async with dO: gamma_t of its dO groups' rows, and the chunk's gamma_last.
  float d_o_gamma[2][S::kThreads * S::kGroupsPerThread];
  float gamma_last[2][S::kThreads];
  // Per warp, as bf16 A fragments (8 bf16 pairs per lane): its k16 blocks of dS^T (step 5, read
  // at the next chunk's step 1) and its k16 blocks of -dVn^T over its tokens (step 3).
  uint4 ds_frag[S::kWarps][S::kKB][32];
  uint4 dvn_frag[S::kWarps][S::kTB][32];
  // kTma: chunk c's W, K, Q, M have landed in buffer c & 1 once full[c & 1] completes its phase
  // ((chunks - 1 - c) / 2) & 1 (the chunks go last to first)
  uint64_t full[2];
};

template <typename T, int kRowGroups, int kSplit, bool kTma>
__global__ void __launch_bounds__(Shape<kRowGroups, kSplit>::kThreads, 1)
    dstate_kernel(const ChunkParams p, const __grid_constant__ ChunkTileMaps tile_maps,
                  const __grid_constant__ CUtensorMap states_map, bool tma_states, bool d_o_vec) {
  using S = Shape<kRowGroups, kSplit>;
  constexpr int kThreads = S::kThreads, kVT = S::kVT, kLdO = S::kLdO;
  constexpr int kGroupsPerRow = S::kGroupsPerRow, kGroupsPerThread = S::kGroupsPerThread;
  constexpr int kNT = S::kNT, kTB = S::kTB, kTN = S::kTN, kKB = S::kKB;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using Smem = DStateSmem<kRowGroups, kSplit, kTma>;
  using TileD = SmemTile<Smem::kLdT, kTma>;
  using TileC = SmemTile<Smem::kLdM, kTma>;
  unsigned char* const smem_base = tile_smem_base<kTma>(smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_base);
  const BackwardParams& b = p.bwd;
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  // rows v 16 row_group .. + 15 of the tile, k slice `split` of kSplit
  const int row_group = warp % kRowGroups, split = warp / kRowGroups;
  const int k_base = split * S::kKSlice;
  const int tw = split * S::kTW;  // this warp's first token of dVn^T
  // The warp of this row group that holds split s (k slice s, tokens s).
  auto group_warp = [&](int s) { return row_group + s * kRowGroups; };
  const int V = p.head_v_dim;
  const int vl = row_group * 16 + g;  // this thread's rows of dS^T, within the tile
  const int v_lo = col0 + vl;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // dS^T: n8 tile nt covers k = k_base + 8 nt .. + 7 (as sc in state.cu, over a slice of k).
  float dsc[kNT][4];
  load_state_part(b.d_final_state, b.dht_s, p, n, hv, v_lo, k_base, dsc);

  // Step 5: the slice's k16 blocks as bf16 A fragments, kept for this warp's own next step 1 and
  // given to the group (published by the next chunk's block barrier).
  uint32_t own_da[kKB][4];
  auto publish_dstate = [&]() {
#pragma unroll
    for (int l = 0; l < kKB; ++l) {
      pack_a_from_c(dsc, l, own_da[l]);
      sm.ds_frag[warp][l][lane] = as_uint4(own_da[l]);
    }
  };
  publish_dstate();

  init_tile_barriers<kTma>(sm.full);
  auto prefetch_tiles = [&](int64_t c) {
    const int64_t slot = first_slot + c;
    const size_t base = ws_index(p, slot, hv, kC * kD);
    const size_t key_base = ws_key_index(p, slot, hv / p.group, kC * kD);
    const int buf = c & 1;
    load_chunk_tiles<kTma, true, kThreads>(p, tile_maps, static_cast<int64_t>(base / kD),
                                           static_cast<int64_t>(key_base / kD), sm.w[buf],
                                           sm.k[buf], sm.q[buf], sm.m[buf],
                                           shared_address(&sm.full[buf]));
    if (tid < kC / 4)
      cp_async_16(sm.gamma[buf] + 4 * tid, p.ws.gamma + ws_index(p, slot, hv, kC) + 4 * tid);
    cp_async_commit();
  };
  // dO of chunk c, rows t < len, columns v < V of this tile, as bf16 groups of 8 columns:
  // group i = tid + j * kThreads is row i / kGroupsPerRow, columns 8 (i % kGroupsPerRow) ..
  const T* d_o = static_cast<const T*>(b.d_o) + seq.batch * b.d_o_s[0] + hv * b.d_o_s[2];
  // bf16 dO with 16-byte rows (then V % 8 == 0: a group is all in or all out) by cp.async.
  const bool d_o_async = std::is_same<T, bf16>::value && d_o_vec;
  uint4 d_o_next[kGroupsPerThread];
  auto load_d_o = [&](int64_t c) {
    const int64_t t0 = seq.begin + c * kC;
    const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
    const float* gamma_c = p.ws.gamma + ws_index(p, first_slot + c, hv, kC);
#pragma unroll
    for (int j = 0; j < kGroupsPerThread; ++j) {
      const int i = tid + j * kThreads, t = i / kGroupsPerRow, v = col0 + (i % kGroupsPerRow) * 8;
      const int valid = t < len ? min(max(V - v, 0), 8) : 0;
      const T* src = d_o + (t0 + t) * b.d_o_s[1] + v * b.d_o_s[3];
      if (d_o_async) {
        const int at = t * kLdO + (i % kGroupsPerRow) * 8;
        cp_async_16_or_zero(&sm.d_o[c & 1][at], valid > 0 ? src : d_o, valid > 0);
      } else {
        d_o_next[j] = valid > 0 ? bwd::load8_bf16<T>(src, b.d_o_s[3], valid, d_o_vec)
                                : make_uint4(0u, 0u, 0u, 0u);
      }
      cp_async_4(&sm.d_o_gamma[c & 1][i], gamma_c + t);
    }
    cp_async_4(&sm.gamma_last[c & 1][tid], gamma_c + kC - 1);
    cp_async_commit();
  };

  if (num_chunks > 0) {
    prefetch_tiles(num_chunks - 1);
    load_d_o(num_chunks - 1);
  }

  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;

    // dS^T here is the gradient of the state leaving chunk c: this warp's slice (tiles.cuh).
    {
      const size_t block = ws_index(p, slot, hv, kD * kD);
      store_state_slice<S::kKSlice>(
          dsc, tma_states, &states_map,
          state_tile_address<S::kKSlice>(smem_base, sizeof(Smem), warp), c < num_chunks - 1,
          static_cast<int64_t>(block / kD), b.dstates + block, col0 + row_group * 16, k_base);
    }

    cp_async_wait<0>();  // this thread's copies of chunk c's tiles (and of its dO groups)
    const float e_last = __expf(sm.gamma_last[buf][tid]);
    // Chunk c's dO, copied or loaded during the previous step, into its buffer (last read two
    // steps ago), and gated by its rows' e^gamma into d_og: each thread its own groups.
#pragma unroll
    for (int j = 0; j < kGroupsPerThread; ++j) {
      const int i = tid + j * kThreads;
      const int at = (i / kGroupsPerRow) * kLdO + (i % kGroupsPerRow) * 8;
      uint4 x4;
      if (d_o_async) {
        x4 = *reinterpret_cast<const uint4*>(&sm.d_o[buf][at]);
      } else {
        x4 = d_o_next[j];
        *reinterpret_cast<uint4*>(&sm.d_o[buf][at]) = x4;
      }
      const float e = __expf(sm.d_o_gamma[buf][i]);
      const uint32_t* x = reinterpret_cast<const uint32_t*>(&x4);
      uint4 gated;
      uint32_t* y = reinterpret_cast<uint32_t*>(&gated);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float2 f = unpack_bf16(x[r]);
        y[r] = pack_bf16(f.x * e, f.y * e);
      }
      *reinterpret_cast<uint4*>(&sm.d_og[buf][at]) = gated;
    }
    // Chunk c's tiles and dO are visible to all warps; every warp is done with chunk c + 1, whose
    // buffers (and the exchange slots) are free; the group's dS^T fragments are visible.
    __syncthreads();
    if (c > 0) {
      prefetch_tiles(c - 1);
      load_d_o(c - 1);
    }
    if constexpr (kTma)
      mbarrier_wait(shared_address(&sm.full[buf]), ((num_chunks - 1 - c) >> 1) & 1);
    const TileD w_tile{shared_address(sm.w[buf])}, k_tile{shared_address(sm.k[buf])},
        q_tile{shared_address(sm.q[buf])};
    const TileC m_tile{shared_address(sm.m[buf])};

    // dO^T's A fragments and the gated ones: rows v of this warp, columns t (k16 blocks)
    uint32_t doa[4][4], doa_gated[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      load_a_cols(doa[kk], sm.d_o[buf], kLdO, row_group * 16, kk * 16);
      load_a_cols(doa_gated[kk], sm.d_og[buf], kLdO, row_group * 16, kk * 16);
    }
    const float* gamma = sm.gamma[buf];  // for exp(gamma_last - gamma) on dVn^T's columns

    // 1, 2. dVn^T over this warp's tokens (n8 tiles tw + 8 nt) = dS^T K^T, dS^T's k16 block kk
    // from the warp that holds it (kk / kKB: a constant; whether it is this warp is warp-uniform),
    // then + dO^T M: M[t][t'] is zero for t' > t, so token block kb meets the warp's n8 tile pair
    // np (tokens tw + 16 np ..) only where kb >= tw / 16 + np.
    float dvn[kTN][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t a[4];
      if (kk / kKB == split) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = own_da[kk % kKB][e];
      } else {
        const uint4 x = sm.ds_frag[group_warp(kk / kKB)][kk % kKB][lane];
        a[0] = x.x, a[1] = x.y, a[2] = x.z, a[3] = x.w;
      }
#pragma unroll
      for (int np = 0; np < kTB; ++np) {
        uint32_t bb[4];
        load_b_rows(bb, k_tile, tw + np * 16, kk * 16);
        mma_bf16(dvn[2 * np], a, bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    {  // columns t = tw + 8 nt + 2 t4 + (e & 1)
      const float last = gamma[kC - 1];
#pragma unroll
      for (int nt = 0; nt < kTN; ++nt) {
        const int t = tw + nt * 8 + 2 * t4;
        const float e0 = __expf(last - gamma[t]), e1 = __expf(last - gamma[t + 1]);
        dvn[nt][0] *= e0, dvn[nt][1] *= e1, dvn[nt][2] *= e0, dvn[nt][3] *= e1;
      }
    }
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
#pragma unroll
      for (int np = 0; np < kTB; ++np) {
        if (kb < split * kTB + np) continue;  // warp-uniform
        uint32_t bb[4];
        load_b_cols(bb, m_tile, tw + np * 16, kb * 16);
        mma_bf16(dvn[2 * np], doa[kb], bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], doa[kb], bb[2], bb[3]);
      }
    }

    // 3. -dVn^T out to the group as bf16 A fragments; dS^T[:, k slice] <- e_last dS^T +
    // (gated dO^T) Q[:, k slice] while the other warps of the group finish theirs.
    uint32_t own_dvn[kTB][4];
#pragma unroll
    for (int nt = 0; nt < kTN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dvn[nt][e] = -dvn[nt][e];
#pragma unroll
    for (int l = 0; l < kTB; ++l) {
      pack_a_from_c(dvn, l, own_dvn[l]);
      sm.dvn_frag[warp][l][lane] = as_uint4(own_dvn[l]);
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dsc[nt][e] *= e_last;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < kKB; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, q_tile, k_base + np * 16, kk * 16);
        mma_bf16(dsc[2 * np], doa_gated[kk], bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], doa_gated[kk], bb[2], bb[3]);
      }
    }

    // 4. dS^T[:, k slice] -= dVn^T W[:, k slice] over all tokens: k16 block kb of -dVn^T is
    // split kb / kTB's.
    named_barrier(1 + row_group, 32 * kSplit);
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      uint32_t va[4];
      if (kb / kTB == split) {
#pragma unroll
        for (int e = 0; e < 4; ++e) va[e] = own_dvn[kb % kTB][e];
      } else {
        const uint4 x = sm.dvn_frag[group_warp(kb / kTB)][kb % kTB][lane];
        va[0] = x.x, va[1] = x.y, va[2] = x.z, va[3] = x.w;
      }
#pragma unroll
      for (int np = 0; np < kKB; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, w_tile, k_base + np * 16, kb * 16);
        mma_bf16(dsc[2 * np], va, bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], va, bb[2], bb[3]);
      }
    }
    // 5. (The group read this warp's ds_frag at this chunk's step 1, before the named barrier; it
    // reads the dvn_frag written above only after it, and this warp rewrites that slot only after
    // the next chunk's block barrier.)
    publish_dstate();
  }

  // The warp's last state store must be complete before the block's shared memory goes.
  if (tma_states && lane == 0) tma_store_wait<false>();

  store_state_part(b.d_initial_state, b.dh0_s, p, n, hv, v_lo, k_base, dsc);
}

template <typename T, int kRowGroups, int kSplit, bool kTma>
void launch(const ChunkParams& p, const ChunkTileMaps& tile_maps, cudaStream_t stream) {
  using S = Shape<kRowGroups, kSplit>;
  size_t smem = sizeof(DStateSmem<kRowGroups, kSplit, kTma>) + (kTma ? 1024 : 0);
  auto* kernel = dstate_kernel<T, kRowGroups, kSplit, kTma>;
  // dS^T's stores by TMA where the device allows (tiles.cuh), in the wide shape: H100, 8 x 4096,
  // 869 -> 776 us; the narrow shape's 64-byte rows measured 902 -> 915 at 1 x 32768 and keep the
  // 4-byte stores.
  CUtensorMap map{};
  const bool tma_states =
      kRowGroups == 4 && encode_states_map<S::kWarps, S::kKSlice>(&map, p.bwd.dstates, p, smem);
  if (tma_states) smem += state_tiles_bytes<S::kWarps, S::kKSlice>();
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + S::kVT - 1) / S::kVT);
  const bool vec = bwd::rows_vectorisable<T>(p.bwd.d_o, p.bwd.d_o_s, p.head_v_dim);
  kernel<<<grid, S::kThreads, smem, stream>>>(p, tile_maps, map, tma_states, vec);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

// FLASHDELTA_GDN_DSTATE_SHAPE, read at every launch (a getenv: cheap, and tests may switch it):
// 1 narrow (32-column tiles), 0 wide, -1 auto.
int getenv_narrow_shape() {
  const char* v = std::getenv("FLASHDELTA_GDN_DSTATE_SHAPE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return -1;
  if (std::strcmp(v, "wide") == 0) return 0;
  if (std::strcmp(v, "narrow") == 0) return 1;
  fail(Error::Kind::kValue, "FLASHDELTA_GDN_DSTATE_SHAPE must be auto, wide or narrow, got '", v,
       "'");
}

bool narrow_shape(const ChunkParams& p) {
  const int requested = getenv_narrow_shape();
  if (requested >= 0) return requested == 1;
  const int64_t wide_blocks =
      static_cast<int64_t>(p.num_seqs) * p.num_v_heads * ((p.head_v_dim + 63) / 64);
  return 2 * wide_blocks <= device_info().sm_count;
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  ChunkTileMaps maps{};
  const bool tma = chunk_tiles_by_tma(&maps, p, device_info().is_sm90);
  if (narrow_shape(p)) {
    if (tma) launch<T, 2, 4, true>(p, maps, stream);
    else launch<T, 2, 4, false>(p, maps, stream);
  } else {
    if (tma) launch<T, 4, 2, true>(p, maps, stream);
    else launch<T, 4, 2, false>(p, maps, stream);
  }
}

}  // namespace

void check_dstate_switches() { (void)getenv_narrow_shape(); }

size_t dstate_smem_bytes() {
  const size_t wide = sizeof(DStateSmem<4, 2, false>), narrow = sizeof(DStateSmem<2, 4, false>);
  return wide > narrow ? wide : narrow;
}

void launch_dstate(const ChunkParams& p, cudaStream_t stream) {
  switch (p.bwd.d_o_dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
