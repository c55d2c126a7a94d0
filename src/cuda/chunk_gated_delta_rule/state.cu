// Chunked gated delta rule, CUDA, phase 2 of 2: the state pass and the output, chunk by chunk.
//
// Per (sequence, value head, column tile of V) one block of kRowGroups x kSplit warps (8 in the
// two shapes the launcher picks by itself):
// row group r owns 16 state columns (value dims) v of the tile, and its kSplit warps split both
// the chunk's tokens and the state's k between them. Warp s of the group keeps its k slice
// [s 128 / kSplit, (s + 1) 128 / kSplit) of S^T (16 x 128 / kSplit, fp32) in mma.sync
// accumulator registers for the whole sequence, and takes the tokens t in
// [s 64 / kSplit, (s + 1) 64 / kSplit) where a product's output runs over t. Two shapes:
//   64-column tiles, 4 row groups x 2 (k halves, token halves)      wide grids
//   32-column tiles, 2 row groups x 4 (k quarters, token quarters)  where 64-column blocks
//                                                                    would fill at most half of
//                                                                    the SMs (B * HV small)
// and a third, narrow2: 32-column tiles of 2 x 2 warps (k halves, token halves), which small
// grids take for the forward (H100, 1 x 32768: forward 1053 us against narrow's 1133; the
// backward's replay 854 with narrow against 872). FLASHDELTA_GDN_STATE_SHAPE=wide|narrow|narrow2
// forces one (a shape the device cannot hold falls back to narrow); =wgmma the warpgroup
// version of state_wgmma.cu (sm_90a; the automatic choice elsewhere). A 64-column 4 x 4 shape
// (16 warps, half the L2 reads per column) measured slower than the others at both protocol
// shapes (1 x 32768: 1462 us forward; 8 x 4096: 748 against wide's 729) and was dropped.
// Per chunk, with W, U, M, gamma (per value head) and K, Q (per key head) from phase 1, warp s:
//   1. gathers S^T's bf16 A fragments over all of k: its own k16 blocks from its registers, the
//      group's other warps' from shared memory (stored there at the end of the previous chunk)
//   2. P^T = S^T W^T, O^T = (S^T Q^T) diag(e^gamma)          16 x 64 / kSplit each, K = 128
//   3. Vn^T = U^T - P^T over its tokens, rounded to bf16 A fragments, plain (for O) and gated
//      by exp(gamma_last - gamma) (for S); both out to the group; one named barrier
//   4. O^T += Vn^T M^T                                       tokens up to its last (causal)
//   5. S^T[:, k slice] = e_last S^T + (Vn^T diag(exp(gamma_last - gamma))) K[:, k slice]
//      over all 64 tokens (the group's gated Vn^T blocks), 16 x 128 / kSplit, K = 64
//   6. its S^T k16 blocks, packed to bf16, out to the group for the next chunk
// Counting (m16n8k16 mma per 16 columns and chunk): P 64, O 64, O += Vn M^T 24 (token halves)
// or 20 (quarters; causal), S 64: 212 to 216, each done once. The previous version kept S^T
// whole in both warps of a pair, which did the S update twice (280 mma, 30% more, and 32 more
// ldmatrix x4 per pair), with a 64-mma dependent stretch after the pair's exchange in every
// warp; now that stretch is 64 / kSplit mma. What the split adds is step 6's exchange, 2 KB
// (halves) or 3 KB (quarters) of shared-memory reads per warp and chunk, against 8 KB (halves)
// of ldmatrix saved per warp. 32-column tiles cannot be 4 x 2 in 8 warps, so there k and the
// tokens go in quarters: 8 warps (2 per scheduler) at 1 x 32768 where the previous narrow shape
// had 4, each with half the chain.
// Every product accumulates in the same order as before (k16 blocks of k for P and O, of t for
// O += Vn M^T and S), from the same bf16 operands: the results are bitwise those of the previous
// kernel, for every shape, and do not depend on the shape (no reassociated sums; the exchanges
// move packed bf16 operands, never fp32 partial sums; the causal blocks skipped differ by shape
// only where M is exactly zero).
// Why not segment-parallel over the sequence (DESIGN.md's S_out = S_in M + R): bench/NOTES.md,
// "Round 3". In short, at 1 x 32768 the 32-column grid is already 128 blocks on 132 SMs (one
// block per SM: shared memory), so segments would add pass 1's work (R over V columns and the
// k x k transition over 128 more rows: about 1.2x a forward pass) without adding throughput.
// The gates are applied on the registers (columns t of the fragments), so phase 1 stores K and
// Q once per key head instead of KR and Qe per value head.
// Working on the transposes is what lets every product take its A operand from the previous
// product's accumulators (common.cuh, mma.sync section).
// B operands come from shared memory by ldmatrix; the next chunk's tiles stream in while this
// one is computed: on sm_90 W, K, Q, M by TMA (7 boxes of 8 KB issued by one thread into
// 128-byte-swizzled tiles, completion on an mbarrier: tiles.cuh), U and gamma by cp.async;
// elsewhere all of them by cp.async into padded rows. The TMA path took the ~30 cp.async a thread
// per chunk off the narrow shapes' 4-warp chains (H100, forward keeping the states, us, cp.async
// -> TMA: 1 x 32768 1097 -> 861, 1 x 8192 280 -> 219; 8 x 4096 on the 8-warp wide shape 933 ->
// 911). FLASHDELTA_GDN_TMA_TILES=0 forces cp.async (A/B; the tests compare both paths bitwise).
// 2-byte o leaves through a double-buffered staging tile, written from the fragments and copied
// out as 16-byte stores after the next chunk's barrier. One block barrier and one row-group
// barrier per chunk (there were two block barriers: the copies were issued and o stored between
// them, on every warp's path).
// The backward's replay (kReplay: p.bwd.states set, p.o null) is the same pass without O (the
// same operands and products for S, so the same bits as the forward's states): it stores S^T
// entering each chunk, bf16 [slot, hv, v, k], rows v of this block's tile (each warp its k
// slice). A training forward (p.saved_states set) stores the same S^T from its own
// pass, and the backward then skips the replay (1 x 32768: 537 MB, against the replay's 858 us).
// On sm_90 each warp's slice leaves by stmatrix into a swizzled shared tile and one TMA tensor
// store per chunk (tiles.cuh's store_state_slice, which dstate.cu shares), elsewhere by 4-byte
// stores; FLASHDELTA_GDN_TMA_STATES=0 forces the latter (for A/B). H100, forward state pass
// keeping the states, 4-byte -> TMA: 8 x 4096 1029 -> 939 us (the no-keep pass is ~735 us; 537 MB
// of stores at 3 TB/s is ~180 us), 1 x 32768 1224 -> 1213 us.
#include <cuda.h>  // CUtensorMap (type only)

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"
#include "cuda/chunk_gated_delta_rule/state_pass.cuh"
#include "cuda/chunk_gated_delta_rule/tiles.cuh"
#include "cuda/device_info.cuh"
#include "cuda/tensor_map.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

// kRowGroups x kSplit warps; a row group's kSplit warps split k and the chunk's tokens.
template <int kRowGroups, int kSplit>
struct Shape {
  static constexpr int kWarps = kRowGroups * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kVT = 16 * kRowGroups;  // state columns per block
  static constexpr int kLdU = kVT + 8;         // 16-byte row padding
  static constexpr int kLdO = kVT + 8;         // likewise: conflict-free 2-byte writes
  static constexpr int kTW = kC / kSplit;      // tokens per warp
  static constexpr int kTN = kTW / 8;          // their n8 tiles (P^T, O^T)
  static constexpr int kTB = kTW / 16;         // their k16 blocks (Vn^T's A fragments)
  static constexpr int kKS = kD / kSplit;      // k per warp (its slice of S^T)
  static constexpr int kNT = kKS / 8;          // the slice's n8 tiles
  static constexpr int kKB = kKS / 16;         // the slice's k16 blocks (S^T's A fragments)
  static_assert(kSplit == 2 || kSplit == 4, "k and tokens split in halves or quarters");
  static_assert(kTB >= 1 && kKB >= 1, "whole k16 blocks per warp");
};

// The tiles of two chunks (double buffer), the group exchanges and the o staging tile.
// Wide (4 x 2): 189 KB for 2-byte o (171 KB for fp32 o), over sm_80's 163 KB
// per block: launch() takes the narrow shape where a device offers less. Narrow (2 x 4) and
// narrow2 (2 x 2): 157 KB (147 KB).
// kTma: W, K, Q, M come by TMA into swizzled 1 KB-aligned tiles without padding (tiles.cuh);
// the struct then starts 1024-byte aligned.
template <typename T, int kRowGroups, int kSplit, bool kTma>
struct StateSmem {
  using S = Shape<kRowGroups, kSplit>;
  static constexpr bool kStagedO = sizeof(T) == 2;
  static constexpr int kLdT = kTma ? kD : kLdD;  // row strides of the tiles W, K, Q
  static constexpr int kLdM = kTma ? kC : kLdC;  // and M
  bf16 w[2][kC * kLdT];
  bf16 k[2][kC * kLdT];  // K of the key head
  bf16 q[2][kC * kLdT];  // Q of the key head (forward only)
  bf16 m[2][kC * kLdM];
  bf16 u[2][kC * S::kLdU];
  float gamma[2][kC];
  // Per warp, as bf16 A fragments (8 bf16 pairs per lane): its k16 blocks of S^T (step 6, read
  // at the next chunk's step 1), and its k16 blocks of Vn^T over its tokens, [0] the state
  // update's operand (gated in the forward, plain in the replay), [1] plain for O (forward).
  uint4 s_frag[S::kWarps][S::kKB][32];
  uint4 vn_frag[S::kWarps][2][S::kTB][32];
  T o[2][kStagedO ? kC * S::kLdO : 8];  // o of chunk c in o[c & 1], [t][v]
  // kTma: chunk c's W, K (Q, M) have landed in buffer c & 1 once full[c & 1] completes its
  // phase (c / 2) & 1
  uint64_t full[2];
};

template <typename T, bool kReplay, int kRowGroups, int kSplit, bool kTma>
__global__ void __launch_bounds__(Shape<kRowGroups, kSplit>::kThreads, 1)
    state_kernel(const ChunkParams p, const __grid_constant__ CUtensorMap states_map,
                 const __grid_constant__ ChunkTileMaps tile_maps, bool tma_states) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using S = Shape<kRowGroups, kSplit>;
  using Smem = StateSmem<T, kRowGroups, kSplit, kTma>;
  constexpr int kThreads = S::kThreads, kVT = S::kVT, kLdU = S::kLdU, kLdO = S::kLdO;
  constexpr int kTN = S::kTN, kTB = S::kTB, kNT = S::kNT, kKB = S::kKB;
  using TileD = SmemTile<Smem::kLdT, kTma>;
  using TileC = SmemTile<Smem::kLdM, kTma>;
  unsigned char* const smem_base = tile_smem_base<kTma>(smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_base);
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_group = warp % kRowGroups, split = warp / kRowGroups;
  const int g = lane >> 2, t4 = lane & 3;
  const int V = p.head_v_dim;
  const int vl = row_group * 16 + g;  // this thread's rows of S^T, within the tile
  const int v_lo = col0 + vl, v_hi = v_lo + 8;
  const int tw = split * S::kTW;       // this warp's first token
  const int k_base = split * S::kKS;   // and first k
  // The warp of this row group that holds split s (k slice s, tokens s).
  auto group_warp = [&](int s) { return row_group + s * kRowGroups; };
  const int hk = hv / p.group;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // This warp's k slice of S^T: n8 tile nt covers k = k_base + 8 nt .. + 7;
  // sc[nt] = (v_lo, k), (v_lo, k + 1), (v_hi, k), (v_hi, k + 1).
  float sc[kNT][4];
  load_state_part(p.initial_state, p.h0_s, p, n, hv, v_lo, k_base, sc);
  // Step 6: the slice's k16 blocks as bf16 A fragments, kept for this warp's own next step 1 and
  // given to the group (published by the next chunk's block barriers).
  uint32_t own_sa[kKB][4];
  auto publish_state = [&]() {
#pragma unroll
    for (int l = 0; l < kKB; ++l) {
      pack_a_from_c(sc, l, own_sa[l]);
      sm.s_frag[warp][l][lane] = as_uint4(own_sa[l]);
    }
  };
  publish_state();

  init_tile_barriers<kTma>(sm.full);
  // W, and K (and for O, Q) of the key head (intra.cu), M for O; U (this block's columns) and
  // gamma for the gates
  auto prefetch = [&](int64_t c) {
    prefetch_chunk<kTma, !kReplay, kThreads, kVT, kLdU>(p, tile_maps, sm, first_slot + c, hv, hk,
                                                        col0, c & 1);
  };
  if (num_chunks > 0) prefetch(0);

  const OutputRows<T, kThreads, kVT, kLdO> o_rows(p, seq, hv, col0);
  // o rows of chunk c from the staging tile (after a block barrier that follows its writes);
  // 2-byte o only (Smem::kStagedO).
  auto store_o = [&](int64_t c) {
    const int64_t t0 = seq.begin + c * kC;
    o_rows.store(sm.o[c & 1], t0, static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC));
  };

  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    // The backward's replay, and the forward when it keeps them for the backward, store S^T
    // entering every chunk: rows v, this warp's k slice; before the barrier, so that the stores
    // leave while the warp waits for the others.
    if (kReplay || p.saved_states != nullptr) {
      const size_t block = ws_index(p, slot, hv, kD * kD);
      store_state_slice<S::kKS>(
          sc, tma_states, &states_map,
          state_tile_address<S::kKS>(smem_base, sizeof(Smem), warp), c > 0,
          static_cast<int64_t>(block / kD),
          (kReplay ? p.bwd.states : p.saved_states) + block, col0 + row_group * 16, k_base);
    }

    cp_async_wait<0>();  // this thread's copies of chunk c's tiles (issued a chunk ago)
    // The one block barrier of the chunk: chunk c's tiles, the group's S^T fragments and chunk
    // c - 1's staged o are visible to all warps, and every warp is done with chunk c - 1, whose
    // tile buffers are refilled now. The copies are issued and the o rows stored after it, so
    // a warp that gets there first starts computing instead of waiting for the others' issue.
    __syncthreads();
    if (c + 1 < num_chunks) prefetch(c + 1);
    if constexpr (kTma) mbarrier_wait(shared_address(&sm.full[buf]), (c >> 1) & 1);
    const TileD w_tile{shared_address(sm.w[buf])}, k_tile{shared_address(sm.k[buf])},
        q_tile{shared_address(sm.q[buf])};
    const TileC m_tile{shared_address(sm.m[buf])};
    // gamma_last from the chunk's gamma tile, in shared memory since this barrier (it was a
    // global load a chunk)
    const float e_last = __expf(sm.gamma[buf][kC - 1]);
    if constexpr (!kReplay && Smem::kStagedO) {
      // o[(c - 1) & 1] is rewritten at chunk c + 1, after its barrier, which this warp reaches
      // only once these stores are issued.
      if (c > 0) store_o(c - 1);
    }

    // 1, 2. P^T = S^T W^T and O^T = S^T Q^T over this warp's tokens (n8 tiles tw + 8 nt), S^T's
    // k16 block kk from the warp that holds it (kk / kKB: a constant; whether it is this warp is
    // warp-uniform).
    float pc[kTN][4] = {}, oc[kTN][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t a[4];
      if (kk / kKB == split) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = own_sa[kk % kKB][e];
      } else {
        to_regs(sm.s_frag[group_warp(kk / kKB)][kk % kKB][lane], a);
      }
#pragma unroll
      for (int np = 0; np < kTB; ++np) {
        uint32_t b[4];
        load_b_rows(b, w_tile, tw + np * 16, kk * 16);
        mma_bf16(pc[2 * np], a, b[0], b[1]);
        mma_bf16(pc[2 * np + 1], a, b[2], b[3]);
        if constexpr (!kReplay) {
          load_b_rows(b, q_tile, tw + np * 16, kk * 16);
          mma_bf16(oc[2 * np], a, b[0], b[1]);
          mma_bf16(oc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    // The gates of this thread's tokens t = tw + 8 nt + 2 t4 + j: O^T = (S^T Q^T) diag(e^gamma)
    // and S' = e_last S + K^T diag(exp(gamma_last - gamma)) Vn (the replay the same: its states
    // are bitwise the forward's).
    float gate_kr[kTN][2];
    {
      const float* gamma = sm.gamma[buf];
#pragma unroll
      for (int nt = 0; nt < kTN; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float gt = gamma[tw + nt * 8 + 2 * t4 + j];
          if constexpr (!kReplay) {
            const float eq = __expf(gt);
            oc[nt][j] *= eq;
            oc[nt][2 + j] *= eq;
          }
          gate_kr[nt][j] = __expf(gamma[kC - 1] - gt);
        }
      }
    }
    // 3. Vn^T = U^T - P^T (U is [t, v] in shared memory), rounded to bf16 as the next operand:
    // this warp's k16 blocks of Vn^T's A fragments (tokens tw + 16 l ..).
    const bf16* u = sm.u[buf];
#pragma unroll
    for (int nt = 0; nt < kTN; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = tw + nt * 8 + 2 * t4 + j;
        pc[nt][j] = __bfloat162float(u[t * kLdU + vl]) - pc[nt][j];
        pc[nt][2 + j] = __bfloat162float(u[t * kLdU + vl + 8]) - pc[nt][2 + j];
      }
    }
    uint32_t own_plain[kTB][4], own_state[kTB][4];
    if constexpr (!kReplay) {
#pragma unroll
      for (int l = 0; l < kTB; ++l) pack_a_from_c(pc, l, own_plain[l]);
    }
#pragma unroll
    for (int nt = 0; nt < kTN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) pc[nt][e] *= gate_kr[nt][e & 1];
#pragma unroll
    for (int l = 0; l < kTB; ++l) pack_a_from_c(pc, l, own_state[l]);
    // Out to the group: the state operand for every warp, the plain blocks for the O of the
    // warps with later tokens (the causal M needs no later tokens: the last split gives none).
#pragma unroll
    for (int l = 0; l < kTB; ++l) {
      sm.vn_frag[warp][0][l][lane] = as_uint4(own_state[l]);
      if (!kReplay && split + 1 < kSplit) sm.vn_frag[warp][1][l][lane] = as_uint4(own_plain[l]);
    }
    named_barrier(1 + row_group, 32 * kSplit);
    // (A warp rewrites its exchange slots only after the next chunk's block barriers.)

    if constexpr (!kReplay) {
      // 4. O^T += Vn^T M^T: M[t][t'] is zero for t' > t, so the k16 blocks of tokens t' up to
      // this warp's last suffice; block kb is split kb / kTB's.
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        if (kb / kTB > split) continue;
        uint32_t va[4];
        if (kb / kTB == split) {
#pragma unroll
          for (int e = 0; e < 4; ++e) va[e] = own_plain[kb % kTB][e];
        } else {
          to_regs(sm.vn_frag[group_warp(kb / kTB)][1][kb % kTB][lane], va);
        }
#pragma unroll
        for (int np = 0; np < kTB; ++np) {
          uint32_t b[4];
          load_b_rows(b, m_tile, tw + np * 16, kb * 16);
          mma_bf16(oc[2 * np], va, b[0], b[1]);
          mma_bf16(oc[2 * np + 1], va, b[2], b[3]);
        }
      }
      // o (this warp's tokens, the group's 16 columns): to the staging tile, or for fp32 o
      // straight to memory.
      if constexpr (Smem::kStagedO) {
#pragma unroll
        for (int nt = 0; nt < kTN; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int t = tw + nt * 8 + 2 * t4 + j;
            sm.o[buf][t * kLdO + vl] = from_f32<T>(oc[nt][j]);
            sm.o[buf][t * kLdO + vl + 8] = from_f32<T>(oc[nt][2 + j]);
          }
        }
      } else {
        const int64_t t0 = seq.begin + c * kC;
        const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
#pragma unroll
        for (int nt = 0; nt < kTN; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int t = tw + nt * 8 + 2 * t4 + j;
            if (t >= len) continue;
            T* row = o_rows.base + (t0 + t) * p.o_s[1];
            if (v_lo < V) row[v_lo * p.o_s[3]] = from_f32<T>(oc[nt][j]);
            if (v_hi < V) row[v_hi * p.o_s[3]] = from_f32<T>(oc[nt][2 + j]);
          }
        }
      }
    }

    // 5. S^T[:, k slice] = e_last S^T + (Vn^T diag(exp(gamma_last - gamma))) K,
    // over all 64 tokens: k16 block kb of Vn^T is split kb / kTB's.
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= e_last;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      uint32_t vs[4];
      if (kb / kTB == split) {
#pragma unroll
        for (int e = 0; e < 4; ++e) vs[e] = own_state[kb % kTB][e];
      } else {
        to_regs(sm.vn_frag[group_warp(kb / kTB)][0][kb % kTB][lane], vs);
      }
#pragma unroll
      for (int np = 0; np < kKB; ++np) {
        uint32_t b[4];
        load_b_cols(b, k_tile, k_base + np * 16, kb * 16);
        mma_bf16(sc[2 * np], vs, b[0], b[1]);
        mma_bf16(sc[2 * np + 1], vs, b[2], b[3]);
      }
    }
    // 6. (The group read this warp's s_frag at this chunk's step 1, before the named barrier.)
    publish_state();
  }
  if constexpr (!kReplay && Smem::kStagedO) {
    if (num_chunks > 0) {
      __syncthreads();  // the last chunk's o is staged
      store_o(num_chunks - 1);
    }
  }

  // The warp's last tile store must be complete before the block's shared memory goes.
  if (tma_states && lane == 0) tma_store_wait<false>();

  store_state_part(p.final_state, p.ht_s, p, n, hv, v_lo, k_base, sc);  // this warp's k slice
}

template <typename T, bool kReplay, int kRowGroups, int kSplit, bool kTma>
void launch(const ChunkParams& p, const ChunkTileMaps& tile_maps, cudaStream_t stream) {
  using S = Shape<kRowGroups, kSplit>;
  size_t smem = sizeof(StateSmem<T, kRowGroups, kSplit, kTma>) + (kTma ? 1024 : 0);
  auto* kernel = state_kernel<T, kReplay, kRowGroups, kSplit, kTma>;
  // The states' stores by TMA where the device allows (tiles.cuh's encode_states_map).
  CUtensorMap map{};
  const bool tma_states = encode_states_map<S::kWarps, S::kKS>(
      &map, kReplay ? p.bwd.states : p.saved_states, p, smem);
  if (tma_states) smem += state_tiles_bytes<S::kWarps, S::kKS>();
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + S::kVT - 1) / S::kVT);
  kernel<<<grid, S::kThreads, smem, stream>>>(p, map, tile_maps, tma_states);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

enum class StateShape { kAuto, kWgmma, kWide, kNarrow, kNarrow2 };

// FLASHDELTA_GDN_STATE_SHAPE, read at every launch (a getenv: cheap, and tests may switch it).
StateShape requested_shape() {
  const char* v = std::getenv("FLASHDELTA_GDN_STATE_SHAPE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return StateShape::kAuto;
  if (std::strcmp(v, "wgmma") == 0) return StateShape::kWgmma;
  if (std::strcmp(v, "wide") == 0) return StateShape::kWide;
  if (std::strcmp(v, "narrow") == 0) return StateShape::kNarrow;
  if (std::strcmp(v, "narrow2") == 0) return StateShape::kNarrow2;
  fail(Error::Kind::kValue,
       "FLASHDELTA_GDN_STATE_SHAPE must be auto, wgmma, wide, narrow or narrow2, got '", v,
       "'");
}

template <typename T, bool kReplay>
void launch(const ChunkParams& p, cudaStream_t stream) {
  // One block per SM (shared memory): 32-column tiles where 64-column ones would fill at most
  // half of the multiprocessors (split 2 x 2 in the forward, 2 x 4 in the replay: measured), or
  // where the device cannot give a block the wide shape's shared memory (sm_80).
  StateShape shape = requested_shape();
  ChunkTileMaps maps{};
  const bool tma = chunk_tiles_by_tma(&maps, p, device_info().is_sm90);
  // The warpgroup version (state_wgmma.cu) on request, where it can run (sm_90a, tiles by TMA);
  // else the automatic choice. Not automatic: slower at 1 x 32768 (H100, bench/NOTES.md,
  // session 17), the same at 8 x 4096.
  if (shape == StateShape::kWgmma) {
    if (tma && launch_state_wgmma(p, maps, stream)) return;
    shape = StateShape::kAuto;
  }
  const size_t optin = static_cast<size_t>(device_info().max_smem_per_block_optin);
  if (shape == StateShape::kAuto) {
    const int64_t wide_blocks = static_cast<int64_t>(p.num_seqs) * p.num_v_heads *
                                ((p.head_v_dim + Shape<4, 2>::kVT - 1) / Shape<4, 2>::kVT);
    const StateShape narrow = kReplay ? StateShape::kNarrow : StateShape::kNarrow2;
    shape = 2 * wide_blocks <= device_info().sm_count ? narrow : StateShape::kWide;
  }
  if (shape == StateShape::kWide && sizeof(StateSmem<T, 4, 2, false>) > optin)
    shape = StateShape::kNarrow;
  switch (shape) {
    case StateShape::kWide:
      if (tma) launch<T, kReplay, 4, 2, true>(p, maps, stream);
      else launch<T, kReplay, 4, 2, false>(p, maps, stream);
      break;
    case StateShape::kNarrow2:
      if (tma) launch<T, kReplay, 2, 2, true>(p, maps, stream);
      else launch<T, kReplay, 2, 2, false>(p, maps, stream);
      break;
    default:
      if (tma) launch<T, kReplay, 2, 4, true>(p, maps, stream);
      else launch<T, kReplay, 2, 4, false>(p, maps, stream);
      break;
  }
}

}  // namespace

void check_state_switches() { (void)requested_shape(); }

void launch_state(const ChunkParams& p, cudaStream_t stream) {
  if (p.bwd.states) {  // the replay reads only the workspace: one instance for every dtype
    launch<bf16, true>(p, stream);
    return;
  }
  switch (p.dtype) {
    case DType::kFloat32: launch<float, false>(p, stream); break;
    case DType::kFloat16: launch<__half, false>(p, stream); break;
    default: launch<bf16, false>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
