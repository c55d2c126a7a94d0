// Chunked gated delta rule, CUDA, phase 2 on Hopper: the state pass (state.cu's algebra) as
// warpgroup MMAs, one warpgroup per (sequence, value head, 64 columns of V). Experimental:
// launched only under FLASHDELTA_GDN_STATE_SHAPE=wgmma, because it is not yet faster (below).
//
// Why. state.cu's mma.sync shapes give each warp 16 state columns and split k and the chunk's
// tokens between the warps of a row group, which trade bf16 fragments through shared memory at
// two barriers a chunk; every row group re-reads W, Q, M and K by ldmatrix. Here the 4 warps of
// a warpgroup hold S^T [64 v x 128 k] (fp32, the m64n128 accumulator layout: warp w rows
// 16 w ..), and each product is one wgmma k loop that reads its B tile once for all 64 rows,
// with A from registers (wgmma_rs_bf16). Per chunk, in commit-group order:
//   1. S^T's k16 blocks as bf16 A fragments (pack_a_from_c); the kept states leave from them
//   2. P^T = S^T W^T, then O^T = S^T Q^T                     m64n64, K = 128, two groups
//   3. Vn^T = U^T - P^T once P's group is done, as A fragments: plain (for O) and gated by
//      exp(gamma_last - gamma_t) (for S)
//   4. S^T = e_last S^T + (Vn^T diag(exp(gamma_last - gamma))) K   m64n128, K = 64, MN-major B
//   5. O^T = O^T diag(e^gamma) + Vn^T M^T                    m64n64, K = 64 (M's upper blocks
//                                                            are zeros); after S, off its chain
//   6. o^T staged as o [t][v] rows, stored during the next chunk (as state.cu)
// No warp exchanges anything: one block barrier a chunk (tile buffers, o's staging). The B
// tiles are state.cu's TMA boxes (tiles.cuh: 64 x 64, 128-byte swizzle), which are wgmma's
// K-major layout for W, Q (B = W^T: rows t, k contiguous) and M, and its MN-major layout for K
// (B = K: rows t are the contraction). U and gamma come by cp.async, as in state.cu.
// The kept states (a training forward, or the backward's replay) leave as in state.cu: each
// warp's 16 rows in two 64-column halves, stmatrix into a swizzled tile, one TMA store each.
// Results are not bitwise state.cu's (wgmma sums a k16 step in its own order): they agree to
// rounding, are deterministic, and the replay is this kernel without O, so the states it gives
// the backward are bitwise the forward's.
// Measured (H100, bench gdn_kernels, session 17; state.cu's choice in brackets): 1 x 32768
// 1152 us keeping the states [narrow2 840], 865 without, 681 without loads after the first two
// chunks (wrong results on purpose: the chain alone); 8 x 4096 905-916 [wide 916-919]. So at
// 1 x 32768, 64 blocks on 64 SMs with one chunk of prefetch, the chunk tiles' load latency
// (~0.36 us a chunk) and the kept states (~0.56 us a chunk, TMA or 4-byte stores alike) are on
// the chain, and the chain itself (~1.3 us a chunk) is longer than its ~900 cycles of MMAs.
// Next: a third tile stage (shared memory: split the ring into W, K, U with three stages and
// Q, M with two), and the states' cost understood before more reordering.
// ptxas serialises the MMAs (a wait after every wgmma) when a register an MMA reads was written
// after wgmma_fence(): fence the A fragments (fence_fragments) as well as the accumulators, and
// read no MMA-written register while another group is in flight (-Xptxas -v reports C7517 /
// C7519 where it injects waits or arrives).
// sm_90a only (the body is a trap elsewhere): launch() checks that the device runs the sm_90a
// code and has the shared memory.
#include <cuda.h>  // CUtensorMap (type only)

#include <cstdint>

#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"
#include "cuda/chunk_gated_delta_rule/state_pass.cuh"
#include "cuda/chunk_gated_delta_rule/tiles.cuh"
#include "cuda/device_info.cuh"
#include "cuda/sm90a_ready.cuh"
#include "cuda/wgmma.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 128;  // one warpgroup
constexpr int kVT = 64;        // state columns (value dims) per block: wgmma's 64 rows
constexpr int kLdU = kVT + 8;  // padded rows: conflict-free scalar reads of U^T
constexpr int kLdO = kVT + 8;  // and writes of o^T

// Tile buffers of two chunks (1024-byte aligned: the swizzle), o's staging, the gates.
template <typename T>
struct WgSmem {
  bf16 w[2][kC * kD];
  bf16 k[2][kC * kD];
  bf16 q[2][kC * kD];  // forward only
  bf16 m[2][kC * kC];  // forward only
  bf16 u[2][kC * kLdU];
  T o[2][kC * kLdO];  // o of chunk c in o[c & 1], [t][v]
  float gamma[2][kC];
  uint64_t full[2];  // chunk c's TMA tiles in buffer c & 1: phase (c / 2) & 1
};

// wgmma descriptors of k16 step kk of the chunk tiles (tiles.cuh's boxes, 8-row groups 1 KB
// apart): K-major over 128 columns (W, Q: two 8 KB boxes), over 64 (M), and MN-major over 64
// rows of 128 columns (K: the step's 16 rows, 64-column boxes 8 KB apart).
[[maybe_unused]] __device__ __forceinline__ uint64_t kmajor128(uint32_t tile, int kk) {
  return smem_descriptor(tile + (kk / 4) * (kC * 128) + (kk % 4) * 32, 16, 1024);
}
[[maybe_unused]] __device__ __forceinline__ uint64_t kmajor64(uint32_t tile, int kk) {
  return smem_descriptor(tile + kk * 32, 16, 1024);
}
[[maybe_unused]] __device__ __forceinline__ uint64_t mnmajor128(uint32_t tile, int kk) {
  return smem_descriptor(tile + kk * 2048, kC * 128, 1024);
}

template <typename T, bool kReplay>
__global__ void __launch_bounds__(kThreads, 1)
    state_wgmma_kernel(const ChunkParams p, const __grid_constant__ CUtensorMap states_map,
                       const __grid_constant__ ChunkTileMaps tile_maps, bool tma_states) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using Smem = WgSmem<T>;
  unsigned char* const smem_base = tile_smem_base<true>(smem_raw);
  Smem& sm = *reinterpret_cast<Smem*>(smem_base);
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int vl = warp * 16 + g;  // this thread's rows of S^T within the tile: vl, vl + 8
  const int v_lo = col0 + vl;
  const int hk = hv / p.group;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // S^T, rows v_lo / v_lo + 8, n8 tile nt covering k = 8 nt + 2 t4 + {0, 1}
  float sc[16][4];
  load_state_part(p.initial_state, p.h0_s, p, n, hv, v_lo, 0, sc);

  init_tile_barriers<true>(sm.full);
  auto prefetch = [&](int64_t c) {
    prefetch_chunk<true, !kReplay, kThreads, kVT, kLdU>(p, tile_maps, sm, first_slot + c, hv, hk,
                                                       col0, c & 1);
  };
  if (num_chunks > 0) prefetch(0);

  const OutputRows<T, kThreads, kVT, kLdO> o_rows(p, seq, hv, col0);
  auto store_o = [&](int64_t c) {  // after a block barrier that follows its staging
    const int64_t t0 = seq.begin + c * kC;
    o_rows.store(sm.o[c & 1], t0, static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC));
  };

  // o^T of a chunk (accumulators oc, valid once its last MMA group is waited for) into
  // staging tile `b`, [t][v]
  auto stage_o = [&](const float (&oc)[8][4], int b) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = nt * 8 + 2 * t4 + j;
        sm.o[b][t * kLdO + vl] = from_f32<T>(oc[nt][j]);
        sm.o[b][t * kLdO + vl + 8] = from_f32<T>(oc[nt][2 + j]);
      }
    }
  };

  // o of chunk c is staged at its end and stored during chunk c + 1.
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    uint32_t sa[8][4];  // 1. S^T as A fragments, k16 block kk
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) pack_a_from_c(sc, kk, sa[kk]);

    // S^T entering the chunk, kept for the backward: this warp's 16 rows in two halves of k,
    // from the fragments (the first half's wait covers both tiles' previous stores). Here, not
    // while the MMAs run: there it measured slower (H100, 1 x 32768: 1152 -> 1289 us).
    if (kReplay || p.saved_states != nullptr) {
      const size_t block = ws_index(p, slot, hv, kD * kD);
      bf16* const states = (kReplay ? p.bwd.states : p.saved_states) + block;
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_state_fragments<64>(
            *reinterpret_cast<const uint32_t(*)[4][4]>(&sa[4 * half]), tma_states, &states_map,
            state_tile_address<64>(smem_base, sizeof(Smem), 2 * warp + half),
            half == 0 && c > 0, static_cast<int64_t>(block / kD), states, col0 + warp * 16,
            64 * half);
    }

    cp_async_wait<0>();  // this thread's copies of chunk c's U and gamma
    // Chunk c's copies are visible, chunk c - 1's o is staged, and every warp is done with
    // chunk c - 1's buffers, which are refilled now.
    __syncthreads();
    if (c + 1 < num_chunks) prefetch(c + 1);
    mbarrier_wait(shared_address(&sm.full[buf]), (c >> 1) & 1);
    const uint32_t w_tile = shared_address(sm.w[buf]), k_tile = shared_address(sm.k[buf]),
                   q_tile = shared_address(sm.q[buf]), m_tile = shared_address(sm.m[buf]);

    // 2. P^T, then O^T
    float pc[8][4], oc[8][4];
    fence_accumulators(sc);
    fence_fragments(sa);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs_bf16<8, false>(pc, sa[kk], kmajor128(w_tile, kk), kk);
    wgmma_commit();
    if constexpr (!kReplay) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)
        wgmma_rs_bf16<8, false>(oc, sa[kk], kmajor128(q_tile, kk), kk);
      wgmma_commit();
    }
    if constexpr (!kReplay) {  // while the MMAs run
      if (c > 0) store_o(c - 1);
    }
    const float* gamma = sm.gamma[buf];
    const float e_last = __expf(gamma[kC - 1]);
    float gate_kr[8][2];  // exp(gamma_last - gamma_t) of this thread's tokens
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        gate_kr[nt][j] = __expf(gamma[kC - 1] - gamma[nt * 8 + 2 * t4 + j]);

    // 3. Vn^T = U^T - P^T as A fragments (token blocks l)
    if constexpr (kReplay) wgmma_wait<0>();
    else wgmma_wait<1>();
    fence_accumulators(pc);
    const bf16* u = sm.u[buf];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = nt * 8 + 2 * t4 + j;
        pc[nt][j] = __bfloat162float(u[t * kLdU + vl]) - pc[nt][j];
        pc[nt][2 + j] = __bfloat162float(u[t * kLdU + vl + 8]) - pc[nt][2 + j];
      }
    }
    uint32_t vn_plain[4][4], vn_state[4][4];
    if constexpr (!kReplay) {
#pragma unroll
      for (int l = 0; l < 4; ++l) pack_a_from_c(pc, l, vn_plain[l]);
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) pc[nt][e] *= gate_kr[nt][e & 1];
#pragma unroll
    for (int l = 0; l < 4; ++l) pack_a_from_c(pc, l, vn_state[l]);

    // 4. S^T = e_last S^T + Vn_g^T K, then 5. O^T = O^T diag(e^gamma) + Vn^T M^T
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= e_last;
    fence_accumulators(sc);
    fence_fragments(vn_state);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < 4; ++kb)
      wgmma_rs_bf16<16, true>(sc, vn_state[kb], mnmajor128(k_tile, kb), 1);
    wgmma_commit();
    if constexpr (!kReplay) {
      wgmma_wait<1>();  // O^T (S^T Q^T); S's group may still run
      fence_accumulators(oc);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float eq = __expf(gamma[nt * 8 + 2 * t4 + j]);
          oc[nt][j] *= eq;
          oc[nt][2 + j] *= eq;
        }
      }
      fence_accumulators(oc);
      fence_fragments(vn_plain);
      wgmma_fence();
#pragma unroll
      for (int kb = 0; kb < 4; ++kb)
        wgmma_rs_bf16<8, false>(oc, vn_plain[kb], kmajor64(m_tile, kb), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulators(oc);
      stage_o(oc, buf);
    } else {
      wgmma_wait<0>();
    }
    fence_accumulators(sc);
  }
  if constexpr (!kReplay) {
    if (num_chunks > 0) {
      __syncthreads();  // the last chunk's o is staged
      store_o(num_chunks - 1);
    }
  }
  // The warp's last state stores must have read their tiles before the block's memory goes.
  if (tma_states && lane == 0) tma_store_wait<false>();

  store_state_part(p.final_state, p.ht_s, p, n, hv, v_lo, 0, sc);
#else
  __trap();  // launched only where the device runs this build's sm_90a code
#endif
}

// Whether the current device runs this instantiation's sm_90a code (sm90a_kernel_ready) with
// `smem` bytes and the states' tiles; opts the kernel in to them.
template <typename T, bool kReplay>
bool kernel_ready(size_t smem) {
  return sm90a_kernel_ready<state_wgmma_kernel<T, kReplay>>([smem](const cudaFuncAttributes&,
                                                                     int device) {
    const size_t full = smem + state_tiles_bytes<8, 64>();
    if (!device_info(device).is_sm90 ||
        full > static_cast<size_t>(device_info(device).max_smem_per_block_optin))
      return false;
    FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(state_wgmma_kernel<T, kReplay>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(full)));
    return true;
  });
}

template <typename T, bool kReplay>
bool launch(const ChunkParams& p, const ChunkTileMaps& maps, cudaStream_t stream) {
  size_t smem = sizeof(WgSmem<T>) + 1024;  // + the 1 KB alignment shift
  if (!kernel_ready<T, kReplay>(smem)) return false;
  CUtensorMap map{};
  const bool tma_states =
      encode_states_map<8, 64>(&map, kReplay ? p.bwd.states : p.saved_states, p, smem);
  if (tma_states) smem += state_tiles_bytes<8, 64>();
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + kVT - 1) / kVT);
  state_wgmma_kernel<T, kReplay><<<grid, kThreads, smem, stream>>>(p, map, maps, tma_states);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  return true;
}

}  // namespace

bool launch_state_wgmma(const ChunkParams& p, const ChunkTileMaps& maps, cudaStream_t stream) {
  if (p.bwd.states) return launch<bf16, true>(p, maps, stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch<float, false>(p, maps, stream);
    case DType::kFloat16: return launch<__half, false>(p, maps, stream);
    default: return launch<bf16, false>(p, maps, stream);
  }
}

}  // namespace flashdelta::detail::cuda::chunk
