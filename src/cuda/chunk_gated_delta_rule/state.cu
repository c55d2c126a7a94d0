// Chunked gated delta rule, CUDA, phase 2 of 2: the state pass and the output, chunk by chunk.
//
// Per (sequence, value head, 64-column tile of V), 128 threads (4 warps); warp w owns 16 state
// columns (value dims) v. It keeps S^T (its 16 x 128 slice, fp32) in mma.sync accumulator
// registers for the whole sequence and per chunk computes, with W, U, KR, Qe, M from phase 1:
//   P^T  = S^T W^T,   O^T = S^T Qe^T                    16 x 64 each, K = 128
//   Vn^T = U^T - P^T                                    (then bf16 A fragments, in registers)
//   O^T += Vn^T M^T                                     K = 64;  o stored (input dtype)
//   S^T  = e_last S^T + Vn^T KR                         16 x 128, K = 64
// Working on the transposes is what lets every product take its A operand from the previous
// product's accumulators (common.cuh, mma.sync section): S and Vn never go through shared memory.
// B operands come from shared memory by ldmatrix; the next chunk's W, KR, Qe, M, U stream in by
// cp.async while this one is computed. Two barriers per chunk.
// The backward's replay (kReplay: p.bwd.states set, p.o null) is the same pass without O (no Qe,
// no M, two products of five): it stores S^T entering each chunk, bf16 [slot, hv, v, k], rows v
// of this block's tile.
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kVT = 16 * kWarps;  // state columns per block
constexpr int kLdU = kVT + 8;

struct StateSmem {
  bf16 w[2][kC * kLdD];
  bf16 kr[2][kC * kLdD];
  bf16 qe[2][kC * kLdD];
  bf16 m[2][kC * kLdC];
  bf16 u[2][kC * kLdU];
};

// The A fragments of k16 block kk from the C fragments of n8 tiles 2kk and 2kk + 1.
template <int kTiles>
__device__ __forceinline__ void to_a(const float (&c)[kTiles][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <typename T, bool kReplay>
__global__ void __launch_bounds__(kThreads, 1) state_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StateSmem& sm = *reinterpret_cast<StateSmem*>(smem_raw);
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int vl = warp * 16 + g;             // this thread's rows of S^T, within the tile
  const int v_lo = col0 + vl, v_hi = v_lo + 8;
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
    copy_in_async<kThreads>(p.ws.kr + base, kD, kC, kD, sm.kr[buf], kLdD);
    if constexpr (!kReplay) {
      copy_in_async<kThreads>(p.ws.qe + base, kD, kC, kD, sm.qe[buf], kLdD);
      copy_in_async<kThreads>(p.ws.m + ws_index(p, slot, hv, kC * kC), kC, kC, kC, sm.m[buf],
                              kLdC);
    }
    copy_in_async<kThreads>(p.ws.u + base + col0, kD, kC, kVT, sm.u[buf], kLdU);
    cp_async_commit();
  };
  if (num_chunks > 0) prefetch(0);

  T* o_base = kReplay ? nullptr : static_cast<T*>(p.o) + seq.batch * p.o_s[0] + hv * p.o_s[2];
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    const float e_last = __expf(p.ws.gamma[ws_index(p, slot, hv, kC) + kC - 1]);
    __syncthreads();  // every warp is done with chunk c - 1, whose buffer is refilled now
    if (c + 1 < num_chunks) {
      prefetch(c + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c's tiles are visible to all warps

    // The backward's replay keeps S^T entering every chunk: rows v, columns k (bf16 pairs).
    if constexpr (kReplay) {
      bf16* st = p.bwd.states + ws_index(p, slot, hv, kD * kD);
#pragma unroll
      for (int nt = 0; nt < 16; ++nt) {
        const int k = nt * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(st + v_lo * kD + k) = pack_bf16(sc[nt][0], sc[nt][1]);
        *reinterpret_cast<uint32_t*>(st + v_hi * kD + k) = pack_bf16(sc[nt][2], sc[nt][3]);
      }
    }

    // P^T = S^T W^T and O^T = S^T Qe^T, from S^T's bf16 A fragments.
    float pc[8][4] = {}, oc[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t a[4];
      to_a(sc, kk, a);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        load_b_rows(b, sm.w[buf], kLdD, np * 16, kk * 16);
        mma_bf16(pc[2 * np], a, b[0], b[1]);
        mma_bf16(pc[2 * np + 1], a, b[2], b[3]);
        if constexpr (!kReplay) {
          load_b_rows(b, sm.qe[buf], kLdD, np * 16, kk * 16);
          mma_bf16(oc[2 * np], a, b[0], b[1]);
          mma_bf16(oc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    // Vn^T = U^T - P^T (U is [t, v] in shared memory), rounded to bf16 as the next operand.
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
    uint32_t va[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) to_a(pc, kk, va[kk]);

    // O^T += Vn^T M^T; then store o rows t of this chunk.
#pragma unroll
    for (int kk = 0; kk < 4 && !kReplay; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        load_b_rows(b, sm.m[buf], kLdC, np * 16, kk * 16);
        mma_bf16(oc[2 * np], va[kk], b[0], b[1]);
        mma_bf16(oc[2 * np + 1], va[kk], b[2], b[3]);
      }
    }
    const int64_t t0 = seq.begin + c * kC;
    const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
#pragma unroll
    for (int nt = 0; nt < 8 && !kReplay; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int t = nt * 8 + 2 * t4 + j;
        if (t >= len) continue;
        T* row = o_base + (t0 + t) * p.o_s[1];
        if (v_lo < V) row[v_lo * p.o_s[3]] = from_f32<T>(oc[nt][j]);
        if (v_hi < V) row[v_hi * p.o_s[3]] = from_f32<T>(oc[nt][2 + j]);
      }
    }

    // S^T = e_last S^T + Vn^T KR.
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= e_last;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < 8; ++np) {
        uint32_t b[4];
        load_b_cols(b, sm.kr[buf], kLdD, np * 16, kk * 16);
        mma_bf16(sc[2 * np], va[kk], b[0], b[1]);
        mma_bf16(sc[2 * np + 1], va[kk], b[2], b[3]);
      }
    }
  }

  if (p.final_state) {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
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

template <typename T, bool kReplay>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(StateSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(state_kernel<T, kReplay>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + kVT - 1) / kVT);
  state_kernel<T, kReplay><<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
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
