// Chunked gated delta rule, CUDA, phase 2 of 2: the state pass and the output, chunk by chunk.
//
// Per (sequence, value head, 64-column tile of V), 256 threads (8 warps) in four pairs (or 32
// columns and two pairs where the grid would be small: Shape below); pair vw owns 16 state
// columns (value dims) v, and both warps of a pair keep the same S^T (its
// 16 x 128 slice, fp32) in mma.sync accumulator registers for the whole sequence. Warp kh of a
// pair (kh = warp / kPairs) takes the chunk's tokens t in [32 kh, 32 kh + 32) where a product's
// output runs over t, so each warp issues about half of what one warp per 16 columns did.
// Per chunk, with W, U, M, gamma (per value head) and K, Q (per key head) from phase 1:
//   P^T  = S^T W^T,  O^T = (S^T Q^T) diag(e^gamma)      16 x 32 each (this warp's t), K = 128
//   Vn^T = U^T - P^T                                     this warp's 32 tokens
//   the pair swaps its halves of Vn^T diag(exp(gamma_last - gamma)) (bf16 A fragments, through
//   shared memory, one named barrier), and warp 0 of the pair gives warp 1 its plain Vn^T half
//   O^T += Vn^T M^T                                      tokens up to this warp's last (causal)
//   S^T  = e_last S^T + (Vn^T diag(exp(gamma_last - gamma))) K     16 x 128, K = 64, both warps
// The gates are applied on the registers (columns t of the fragments), so phase 1 stores K and
// Q once per key head instead of KR and Qe per value head.
// Working on the transposes is what lets every product take its A operand from the previous
// product's accumulators (common.cuh, mma.sync section): S and Vn never go through shared memory
// except for the swap. Both warps of a pair run the same instructions on the same values, so
// their copies of S stay bitwise equal (deterministic: no reassociated sums).
// B operands come from shared memory by ldmatrix; the next chunk's tiles stream in by cp.async
// while this one is computed. 2-byte o leaves through a staging tile, written from the fragments
// and copied out as 16-byte stores after the next chunk's first barrier. Two block barriers per
// chunk. Per warp and chunk: 32 + 32 mma (P, O), 8 or 16 (O += Vn M^T), 64 (S).
// The backward's replay (kReplay: p.bwd.states set, p.o null) is the same pass without O, and
// with phase 1's KR per value head in place of the gated Vn and K (the reverse pass reads KR):
// it stores S^T entering each chunk, bf16 [slot, hv, v, k], rows v of this block's tile (warp kh
// writes the k half kh).
#include <cstdint>

#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

// kPairs pairs of warps: 4 (64 state columns per block), or 2 (32 columns) where 4 would leave
// more than half of the multiprocessors idle (B * HV small): twice the blocks, each SM's tensor
// cores shared by half the warps.
template <int kPairs>
struct Shape {
  static constexpr int kWarps = 2 * kPairs;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kVT = 16 * kPairs;  // state columns per block
  static constexpr int kLdU = kVT + 8;     // 16-byte row padding
  static constexpr int kLdO = kVT + 8;     // likewise: conflict-free 2-byte writes
};

// With 4 pairs: 163 KB for 2-byte o (the most an sm_80 block may have), 154 KB for fp32 o, which
// is stored from the fragments directly (8 lanes cover 32 contiguous bytes).
template <typename T, int kPairs>
struct StateSmem {
  using S = Shape<kPairs>;
  static constexpr bool kStagedO = sizeof(T) == 2;
  static constexpr int kLdO = S::kLdO;
  bf16 w[2][kC * kLdD];
  bf16 k[2][kC * kLdD];  // K of the key head (forward), KR of the value head (replay)
  bf16 q[2][kC * kLdD];  // Q of the key head (forward only)
  bf16 m[2][kC * kLdC];
  bf16 u[2][kC * S::kLdU];
  float gamma[2][kC];
  // The pairs' Vn^T halves (8 bf16 pairs per lane): for the state update (gated in the forward,
  // plain in the replay) both ways, and plain from warp kh = 0 to kh = 1 for O.
  uint4 swap_state[S::kWarps][2][32];
  uint4 swap_o[kPairs][2][32];
  T o[kStagedO ? kC * S::kLdO : 8];  // o of the previous chunk, [t][v]
};

template <typename T, bool kReplay, int kPairs>
__global__ void __launch_bounds__(Shape<kPairs>::kThreads, 1) state_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using Smem = StateSmem<T, kPairs>;
  constexpr int kThreads = Shape<kPairs>::kThreads, kVT = Shape<kPairs>::kVT;
  constexpr int kLdU = Shape<kPairs>::kLdU;
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pair = warp % kPairs, kh = warp / kPairs, partner = warp ^ kPairs;
  const int g = lane >> 2, t4 = lane & 3;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int vl = pair * 16 + g;  // this thread's rows of S^T, within the tile
  const int v_lo = col0 + vl, v_hi = v_lo + 8;
  const int tw = 32 * kh;        // this warp's first token
  const int hk = hv / p.group;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // S^T: n8 tile nt covers k = 8 nt .. 8 nt + 7; sc[nt] = (v_lo, k), (v_lo, k + 1), (v_hi, ..).
  float sc[16][4];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = nt * 8 + 2 * t4 + j;
      float lo = 0.f, hi = 0.f;
      if (p.initial_state && k < K) {
        const float* h0 = p.initial_state + n * p.h0_s[0] + hv * p.h0_s[1] + k * p.h0_s[2];
        if (v_lo < V) lo = h0[v_lo * p.h0_s[3]];
        if (v_hi < V) hi = h0[v_hi * p.h0_s[3]];
      }
      sc[nt][j] = lo;
      sc[nt][2 + j] = hi;
    }
  }

  auto prefetch = [&](int64_t c) {
    const int64_t slot = first_slot + c;
    const size_t base = ws_index(p, slot, hv, kC * kD);
    const int buf = c & 1;
    copy_in_async<kThreads>(p.ws.w + base, kD, kC, kD, sm.w[buf], kLdD);
    if constexpr (kReplay) {
      copy_in_async<kThreads>(p.ws.kr + base, kD, kC, kD, sm.k[buf], kLdD);
    } else {  // K and Q of the key head (intra.cu), gamma for the gates
      const size_t key_base = ws_key_index(p, slot, hk, kC * kD);
      copy_in_async<kThreads>(p.ws.kr + key_base, kD, kC, kD, sm.k[buf], kLdD);
      copy_in_async<kThreads>(p.ws.qe + key_base, kD, kC, kD, sm.q[buf], kLdD);
      copy_in_async<kThreads>(p.ws.m + ws_index(p, slot, hv, kC * kC), kC, kC, kC, sm.m[buf],
                              kLdC);
      if (threadIdx.x < kC / 4)
        cp_async16(sm.gamma[buf] + 4 * threadIdx.x,
                   p.ws.gamma + ws_index(p, slot, hv, kC) + 4 * threadIdx.x);
    }
    copy_in_async<kThreads>(p.ws.u + base + col0, kD, kC, kVT, sm.u[buf], kLdU);
    cp_async_commit();
  };
  if (num_chunks > 0) prefetch(0);

  T* const o_base =
      kReplay ? nullptr : static_cast<T*>(p.o) + seq.batch * p.o_s[0] + hv * p.o_s[2];
  // 16-byte stores of o where its rows allow them (the usual contiguous [B, T, HV, V] output).
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const bool o_vec = !kReplay && p.o_s[3] == 1 &&
                     (p.o_s[1] * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(o_base) % 16 == 0;
  // o rows of chunk c from the staging tile (after a block barrier that follows its writes);
  // 2-byte o only (Smem::kStagedO).
  auto store_o = [&](int64_t c) {
    const int64_t t0 = seq.begin + c * kC;
    const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
    for (int i = threadIdx.x; i < kC * (kVT / kPer); i += kThreads) {
      const int t = i / (kVT / kPer), v = (i % (kVT / kPer)) * kPer;
      if (t >= len) continue;
      const T* src = sm.o + t * Smem::kLdO + v;
      T* dst = o_base + (t0 + t) * p.o_s[1] + static_cast<int64_t>(col0 + v) * p.o_s[3];
      if (o_vec && col0 + v + kPer <= V) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j)
          if (col0 + v + j < V) dst[j * p.o_s[3]] = src[j];
      }
    }
  };

  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    const float e_last = __expf(p.ws.gamma[ws_index(p, slot, hv, kC) + kC - 1]);
    __syncthreads();  // every warp is done with chunk c - 1, whose buffers are refilled now
    if constexpr (!kReplay && Smem::kStagedO) {
      if (c > 0) store_o(c - 1);
    }
    if (c + 1 < num_chunks) {
      prefetch(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c's tiles are visible to all warps; the o staging tile is free

    // The backward's replay keeps S^T entering every chunk: rows v, columns k (bf16 pairs);
    // warp kh of the pair writes k in [64 kh, 64 kh + 64).
    if constexpr (kReplay) {
      bf16* st = p.bwd.states + ws_index(p, slot, hv, kD * kD);
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        if ((nt >> 3) != kh) continue;
        const int k = nt * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(st + v_lo * kD + k) = pack_bf16(sc[nt][0], sc[nt][1]);
        *reinterpret_cast<uint32_t*>(st + v_hi * kD + k) = pack_bf16(sc[nt][2], sc[nt][3]);
      }
    }

    // P^T = S^T W^T and O^T = S^T Q^T over this warp's tokens (n8 tiles tw + 8 nt).
    float pc[4][4] = {}, oc[4][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t a[4];
      pack_a_from_c(sc, kk, a);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        load_b_rows(b, sm.w[buf], kLdD, tw + np * 16, kk * 16);
        mma_bf16(pc[2 * np], a, b[0], b[1]);
        mma_bf16(pc[2 * np + 1], a, b[2], b[3]);
        if constexpr (!kReplay) {
          load_b_rows(b, sm.q[buf], kLdD, tw + np * 16, kk * 16);
          mma_bf16(oc[2 * np], a, b[0], b[1]);
          mma_bf16(oc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    // The gates of this thread's tokens t = tw + 8 nt + 2 t4 + j: O^T = (S^T Q^T) diag(e^gamma)
    // and S' = e_last S + K^T diag(exp(gamma_last - gamma)) Vn (forward; the replay has KR).
    float gate_kr[4][2];
    if constexpr (!kReplay) {
      const float* gamma = sm.gamma[buf];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float gt = gamma[tw + nt * 8 + 2 * t4 + j];
          const float eq = __expf(gt);
          oc[nt][j] *= eq;
          oc[nt][2 + j] *= eq;
          gate_kr[nt][j] = __expf(gamma[kC - 1] - gt);
        }
      }
    }
    // Vn^T = U^T - P^T (U is [t, v] in shared memory), rounded to bf16 as the next operand:
    // k16 blocks 2 kh, 2 kh + 1 of Vn^T's A fragments; the pair swaps them.
    const bf16* u = sm.u[buf];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = tw + nt * 8 + 2 * t4 + j;
        pc[nt][j] = __bfloat162float(u[t * kLdU + vl]) - pc[nt][j];
        pc[nt][2 + j] = __bfloat162float(u[t * kLdU + vl + 8]) - pc[nt][2 + j];
      }
    }
    // Swap through shared memory: every warp gives its half for the state update (gated in the
    // forward, plain in the replay); warp kh = 0 also gives its plain half for kh = 1's O (the
    // causal M needs no later tokens for kh = 0).
    uint32_t own[2][4], own_s[2][4], other_s[2][4], other_o[2][4];
    pack_a_from_c(pc, 0, own[0]);
    pack_a_from_c(pc, 1, own[1]);
    if constexpr (kReplay) {
#pragma unroll
      for (int l = 0; l < 2; ++l)
#pragma unroll
        for (int e = 0; e < 4; ++e) own_s[l][e] = own[l][e];
    } else {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) pc[nt][e] *= gate_kr[nt][e & 1];
      pack_a_from_c(pc, 0, own_s[0]);
      pack_a_from_c(pc, 1, own_s[1]);
    }
#pragma unroll
    for (int l = 0; l < 2; ++l) {
      sm.swap_state[warp][l][lane] = make_uint4(own_s[l][0], own_s[l][1], own_s[l][2], own_s[l][3]);
      if (!kReplay && kh == 0)
        sm.swap_o[pair][l][lane] = make_uint4(own[l][0], own[l][1], own[l][2], own[l][3]);
    }
    named_barrier(1 + pair, 64);
#pragma unroll
    for (int l = 0; l < 2; ++l) {
      const uint4 x = sm.swap_state[partner][l][lane];
      other_s[l][0] = x.x, other_s[l][1] = x.y, other_s[l][2] = x.z, other_s[l][3] = x.w;
      if (!kReplay && kh == 1) {
        const uint4 y = sm.swap_o[pair][l][lane];
        other_o[l][0] = y.x, other_o[l][1] = y.y, other_o[l][2] = y.z, other_o[l][3] = y.w;
      } else {
        other_o[l][0] = other_o[l][1] = other_o[l][2] = other_o[l][3] = 0u;  // unused
      }
    }
    // Vn^T's A fragments in token order (selects, not a runtime index into registers): va for
    // O (k16 blocks 0, 1 are used by kh = 1 only, from the partner), vs for the state update.
    uint32_t va[4][4], vs[4][4];
#pragma unroll
    for (int l = 0; l < 2; ++l)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        va[l][e] = kh ? other_o[l][e] : own[l][e];
        va[2 + l][e] = own[l][e];  // read by kh = 1 only: its own tokens
        vs[l][e] = kh ? other_s[l][e] : own_s[l][e];
        vs[2 + l][e] = kh ? own_s[l][e] : other_s[l][e];
      }
    // (The partner rewrites its swap slot only after the next chunk's block barriers.)

    if constexpr (!kReplay) {
      // O^T += Vn^T M^T: M[t][t'] is zero for t' > t, so tokens t' < tw + 32 suffice.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk > 2 * kh + 1) continue;
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b[4];
          load_b_rows(b, sm.m[buf], kLdC, tw + np * 16, kk * 16);
          mma_bf16(oc[2 * np], va[kk], b[0], b[1]);
          mma_bf16(oc[2 * np + 1], va[kk], b[2], b[3]);
        }
      }
      // o (this warp's tokens, the pair's 16 columns): to the staging tile, or for fp32 o
      // straight to memory.
      if constexpr (Smem::kStagedO) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int t = tw + nt * 8 + 2 * t4 + j;
            sm.o[t * Smem::kLdO + vl] = from_f32<T>(oc[nt][j]);
            sm.o[t * Smem::kLdO + vl + 8] = from_f32<T>(oc[nt][2 + j]);
          }
        }
      } else {
        const int64_t t0 = seq.begin + c * kC;
        const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int t = tw + nt * 8 + 2 * t4 + j;
            if (t >= len) continue;
            T* row = o_base + (t0 + t) * p.o_s[1];
            if (v_lo < V) row[v_lo * p.o_s[3]] = from_f32<T>(oc[nt][j]);
            if (v_hi < V) row[v_hi * p.o_s[3]] = from_f32<T>(oc[nt][2 + j]);
          }
        }
      }
    }

    // S^T = e_last S^T + Vn^T KR (replay) = e_last S^T + (Vn^T diag(exp(gamma_last - gamma))) K.
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= e_last;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < 8; ++np) {
        uint32_t b[4];
        load_b_cols(b, sm.k[buf], kLdD, np * 16, kk * 16);
        mma_bf16(sc[2 * np], vs[kk], b[0], b[1]);
        mma_bf16(sc[2 * np + 1], vs[kk], b[2], b[3]);
      }
    }
  }
  if constexpr (!kReplay && Smem::kStagedO) {
    if (num_chunks > 0) {
      __syncthreads();  // the last chunk's o is staged
      store_o(num_chunks - 1);
    }
  }

  if (p.final_state) {  // warp kh of the pair writes k in [64 kh, 64 kh + 64)
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      if ((nt >> 3) != kh) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int k = nt * 8 + 2 * t4 + j;
        if (k >= K) continue;
        float* ht = p.final_state + n * p.ht_s[0] + hv * p.ht_s[1] + k * p.ht_s[2];
        if (v_lo < V) ht[v_lo * p.ht_s[3]] = sc[nt][j];
        if (v_hi < V) ht[v_hi * p.ht_s[3]] = sc[nt][2 + j];
      }
    }
  }
}

template <typename T, bool kReplay, int kPairs>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(StateSmem<T, kPairs>);
  auto* kernel = state_kernel<T, kReplay, kPairs>;
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  constexpr int kVT = Shape<kPairs>::kVT;
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + kVT - 1) / kVT);
  kernel<<<grid, Shape<kPairs>::kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

template <typename T, bool kReplay>
void launch(const ChunkParams& p, cudaStream_t stream) {
  // One block per SM (shared memory): halve the columns per block when 64-column blocks would
  // fill at most half of the multiprocessors.
  const int64_t wide_blocks = static_cast<int64_t>(p.num_seqs) * p.num_v_heads *
                              ((p.head_v_dim + Shape<4>::kVT - 1) / Shape<4>::kVT);
  if (2 * wide_blocks <= device_info().sm_count) launch<T, kReplay, 2>(p, stream);
  else launch<T, kReplay, 4>(p, stream);
}

}  // namespace

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
