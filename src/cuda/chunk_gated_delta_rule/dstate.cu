// Chunked gated delta rule, CUDA backward, the reverse state pass: the gradient dS of the state,
// carried backwards through the chunks (launch.cu, above backward(), has the whole picture).
//
// Per block (sequence, value head, 64-column tile of V), 4 warps, each owning 16 rows v of
// dS^T [v, k] in mma.sync accumulators (the state kernel's layout, state.cu). Per chunk, last to
// first, with W, KR, Qe, M from the forward's intra pass and dO from the caller:
//   store dS^T (bf16): the gradient of the state leaving this chunk, for the gradient kernel
//   dVn^T = dS^T KR^T + dO^T M                          16 x 64 per warp, K = 128 and 64
//   dS^T <- e_last dS^T + dO^T Qe - dVn^T W             16 x 128 per warp, K = 64
// which differentiates S' = e_last S + KR^T Vn, O = Qe S + M Vn and Vn = U - W S with respect to
// S (the CPU kernel's "dS_in" line). Column v of dS depends only on column v of dS' and dO, so
// the V tiles are independent. dS^T and dVn^T stay in registers (their accumulators are the
// next product's A fragments); dO^T comes from shared memory by transposed ldmatrix. The
// workspace tiles of the next chunk stream in by cp.async while this one is computed; dO of the
// chunk is loaded (and converted) by the block after the first barrier.
//
// Work per chunk and 64 columns: 3 products of 64 x 64 x 128 and 2 of 64 x 64 x 64 (~1.6 M
// multiply-adds) for 48 KB of tiles read: memory- and latency-bound like the forward state pass.
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kVT = 16 * kWarps;  // state columns per block
constexpr int kLdO = kVT + 8;

struct DStateSmem {
  bf16 w[2][kC * kLdD];
  bf16 kr[2][kC * kLdD];
  bf16 qe[2][kC * kLdD];
  bf16 m[2][kC * kLdC];
  bf16 d_o[kC * kLdO];  // dO rows t, columns v of this tile
};

template <int kTiles>
__device__ __forceinline__ void to_a(const float (&c)[kTiles][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

__global__ void __launch_bounds__(kThreads, 1) dstate_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  DStateSmem& sm = *reinterpret_cast<DStateSmem*>(smem_raw);
  const BackwardParams& b = p.bwd;
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int vl = warp * 16 + g;  // this thread's rows of dS^T, within the tile
  const int v_lo = col0 + vl, v_hi = v_lo + 8;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // dS^T: n8 tile nt covers k = 8 nt .. 8 nt + 7 (as sc in state.cu).
  float dsc[16][4];
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = nt * 8 + 2 * t4 + j;
      float lo = 0.f, hi = 0.f;
      if (b.d_final_state && k < K) {
        const float* dht = b.d_final_state + n * b.dht_s[0] + hv * b.dht_s[1] + k * b.dht_s[2];
        if (v_lo < V) lo = dht[v_lo * b.dht_s[3]];
        if (v_hi < V) hi = dht[v_hi * b.dht_s[3]];
      }
      dsc[nt][j] = lo;
      dsc[nt][2 + j] = hi;
    }
  }

  auto prefetch = [&](int64_t c) {
    const int64_t slot = first_slot + c;
    const size_t base = ws_index(p, slot, hv, kC * kD);
    const int buf = c & 1;
    copy_in_async<kThreads>(p.ws.w + base, kD, kC, kD, sm.w[buf], kLdD);
    copy_in_async<kThreads>(p.ws.kr + base, kD, kC, kD, sm.kr[buf], kLdD);
    copy_in_async<kThreads>(p.ws.qe + base, kD, kC, kD, sm.qe[buf], kLdD);
    copy_in_async<kThreads>(p.ws.m + ws_index(p, slot, hv, kC * kC), kC, kC, kC, sm.m[buf],
                            kLdC);
    cp_async_commit();
  };
  if (num_chunks > 0) prefetch(num_chunks - 1);

  const int64_t d_o = seq.batch * b.d_o_s[0] + hv * b.d_o_s[2];  // element offset
  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    const float e_last = __expf(p.ws.gamma[ws_index(p, slot, hv, kC) + kC - 1]);
    const int64_t t0 = seq.begin + c * kC;
    const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);

    // dS^T here is the gradient of the state leaving chunk c.
    bf16* dst = b.dstates + ws_index(p, slot, hv, kD * kD);
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
      const int k = nt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(dst + v_lo * kD + k) = pack_bf16(dsc[nt][0], dsc[nt][1]);
      *reinterpret_cast<uint32_t*>(dst + v_hi * kD + k) = pack_bf16(dsc[nt][2], dsc[nt][3]);
    }

    __syncthreads();  // every warp is done with chunk c + 1: its buffer and d_o are refilled
    if (c > 0) {
      prefetch(c - 1);
    }
    for (int i = threadIdx.x; i < kC * kVT; i += kThreads) {
      const int t = i / kVT, v = col0 + i % kVT;
      const float x = (t < len && v < V)
                          ? load_float(b.d_o, b.d_o_dtype, d_o + (t0 + t) * b.d_o_s[1] + v * b.d_o_s[3])
                          : 0.f;
      sm.d_o[t * kLdO + i % kVT] = __float2bfloat16_rn(x);
    }
    if (c > 0) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();  // chunk c's tiles and dO are visible to all warps

    // dVn^T = dS^T KR^T + dO^T M: 16 rows v x 64 columns t per warp.
    float dvn[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      uint32_t a[4];
      to_a(dsc, kk, a);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_rows(bb, sm.kr[buf], kLdD, np * 16, kk * 16);
        mma_bf16(dvn[2 * np], a, bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    uint32_t doa[4][4];  // dO^T's A fragments: rows v of this warp, columns t
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) load_a_cols(doa[kk], sm.d_o, kLdO, warp * 16, kk * 16);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, sm.m[buf], kLdC, np * 16, kk * 16);
        mma_bf16(dvn[2 * np], doa[kk], bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], doa[kk], bb[2], bb[3]);
      }
    }

    // dS^T <- e_last dS^T + dO^T Qe - dVn^T W.
#pragma unroll
    for (int nt = 0; nt < 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dsc[nt][e] *= e_last;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dvn[nt][e] = -dvn[nt][e];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t va[4];
      to_a(dvn, kk, va);
#pragma unroll
      for (int np = 0; np < 8; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, sm.qe[buf], kLdD, np * 16, kk * 16);
        mma_bf16(dsc[2 * np], doa[kk], bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], doa[kk], bb[2], bb[3]);
        load_b_cols(bb, sm.w[buf], kLdD, np * 16, kk * 16);
        mma_bf16(dsc[2 * np], va, bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], va, bb[2], bb[3]);
      }
    }
  }

  if (b.d_initial_state) {
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int k = nt * 8 + 2 * t4 + j;
        if (k >= K) continue;
        float* dh0 = b.d_initial_state + n * b.dh0_s[0] + hv * b.dh0_s[1] + k * b.dh0_s[2];
        if (v_lo < V) dh0[v_lo * b.dh0_s[3]] = dsc[nt][j];
        if (v_hi < V) dh0[v_hi * b.dh0_s[3]] = dsc[nt][2 + j];
      }
    }
  }
}

}  // namespace

void launch_dstate(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(DStateSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
      dstate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + kVT - 1) / kVT);
  dstate_kernel<<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda::chunk
