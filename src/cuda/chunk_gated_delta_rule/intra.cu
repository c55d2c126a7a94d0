// Chunked gated delta rule, CUDA, phase 1 of 2: everything inside one chunk that does not need
// the state (see common.cuh for the whole picture).
//
// Per (slot, value head), 256 threads (8 warps), one 64-token chunk:
//   q, k normalised (fp32 norms, bf16 rows; q scaled), gamma = cumsum(g) (fp32), beta
//   A  = strictLower(b_i exp(gamma_i - gamma_j) k_i.k_j)       K K^T on the tensor cores
//   T  = (I + A)^-1                                            fp32 substitution (common.cuh)
//   W  = T diag(b e^gamma) K,  U = T diag(b) V                 tensor cores, fp32 accumulators
//   M  = Gamma * causal(Q K^T)                                 (the output's intra-chunk part)
//   KR = diag(exp(gamma_last - gamma)) K,  Qe = diag(e^gamma) Q
// writes W, U, KR, Qe, M (bf16) and gamma (fp32) to the workspace (and T when the backward
// asks). Shared memory: 110 KB, two blocks per SM. Work per chunk and head: 4 products of 0.5 M
// multiply-adds and the inverse.
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 256;

struct IntraSmem {
  bf16 qn[kC * kLdD];   // normalised, scaled q
  bf16 kn[kC * kLdD];   // normalised k
  bf16 x[kC * kLdD];    // operand: diag(b e) K, then diag(b) V
  float a[kC * kLdCf];  // K K^T, then A
  bf16 t[kC * kLdC];    // T = (I + A)^-1
  float out[kC * kLdDf];
  float gamma[kC], beta[kC], be[kC];
};

// out (fp32 [64, kLdDf]) -> dst ([64, 128] bf16 in the workspace), 8 values per thread access.
__device__ __forceinline__ void store_out(const float* out, bf16* dst) {
  for (int i = threadIdx.x; i < kC * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    alignas(16) bf16 h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16_rn(out[r * kLdDf + c + j]);
    *reinterpret_cast<uint4*>(dst + r * kD + c) = *reinterpret_cast<const uint4*>(h);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) intra_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  IntraSmem& sm = *reinterpret_cast<IntraSmem*>(smem_raw);
  const int64_t slot = blockIdx.x;
  const int hv = blockIdx.y, hk = hv / p.group;
  const ChunkRef ch = chunk_of_slot(p, slot);
  if (ch.len == 0) return;

  load_gates(p, ch, hv, sm.gamma, sm.beta);
  load_tile<T, kThreads>(static_cast<const T*>(p.k), p.k_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, 1.f, nullptr, sm.kn);
  load_tile<T, kThreads>(static_cast<const T*>(p.q), p.q_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, p.scale, nullptr, sm.qn);
  __syncthreads();

  // K K^T, and diag(b e^gamma) K beside it.
  mma_tile<kC, kC, kD, false, true, kThreads>(sm.a, kLdCf, sm.kn, kLdD, sm.kn, kLdD, false);
  if (threadIdx.x < kC) sm.be[threadIdx.x] = sm.beta[threadIdx.x] * __expf(sm.gamma[threadIdx.x]);
  __syncthreads();
  for (int i = threadIdx.x; i < kC * kD; i += kThreads) {
    const int r = i / kD, d = i % kD;
    sm.x[r * kLdD + d] = __float2bfloat16_rn(sm.be[r] * __bfloat162float(sm.kn[r * kLdD + d]));
  }
  for (int i = threadIdx.x; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    float& a = sm.a[r * kLdCf + c];
    a = c < r ? sm.beta[r] * __expf(sm.gamma[r] - sm.gamma[c]) * a : 0.f;
  }
  __syncthreads();

  // T = (I + A)^-1; `out` is free until W, so it holds T in fp32 and the scratch.
  invert_unit_lower<kThreads>(sm.a, sm.out, sm.out + kC * kLdCf, sm.t);
  __syncthreads();
  if (p.ws.t) {  // the backward reuses T (bf16, as the products take it)
    bf16* t_out = p.ws.t + ws_index(p, slot, hv, kC * kC);
    for (int i = threadIdx.x; i < kC * kC; i += kThreads)
      t_out[i] = sm.t[(i / kC) * kLdC + i % kC];
  }

  const size_t base = ws_index(p, slot, hv, kC * kD);
  // W = T diag(b e) K, and M = Q K^T beside it (A is no longer needed).
  mma_tile<kC, kD, kC, false, false, kThreads>(sm.out, kLdDf, sm.t, kLdC, sm.x, kLdD, false);
  mma_tile<kC, kC, kD, false, true, kThreads>(sm.a, kLdCf, sm.qn, kLdD, sm.kn, kLdD, false);
  __syncthreads();
  store_out(sm.out, p.ws.w + base);
  bf16* m_out = p.ws.m + ws_index(p, slot, hv, kC * kC);
  for (int i = threadIdx.x; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    const float x = c <= r ? __expf(sm.gamma[r] - sm.gamma[c]) * sm.a[r * kLdCf + c] : 0.f;
    m_out[i] = __float2bfloat16_rn(x);
  }
  __syncthreads();  // x is reloaded
  load_tile<T, kThreads>(static_cast<const T*>(p.v), p.v_s, ch.batch, ch.t0, ch.len, hv,
                         p.head_v_dim, false, 1.f, sm.beta, sm.x);
  __syncthreads();
  mma_tile<kC, kD, kC, false, false, kThreads>(sm.out, kLdDf, sm.t, kLdC, sm.x, kLdD, false);
  __syncthreads();
  store_out(sm.out, p.ws.u + base);

  // KR = diag(exp(gamma_last - gamma)) K, Qe = diag(e^gamma) Q; gamma.
  const float last = sm.gamma[kC - 1];
  for (int i = threadIdx.x; i < kC * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    const float rr = __expf(last - sm.gamma[r]), er = __expf(sm.gamma[r]);
    alignas(16) bf16 hk[8], hq[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      hk[j] = __float2bfloat16_rn(rr * __bfloat162float(sm.kn[r * kLdD + c + j]));
      hq[j] = __float2bfloat16_rn(er * __bfloat162float(sm.qn[r * kLdD + c + j]));
    }
    *reinterpret_cast<uint4*>(p.ws.kr + base + r * kD + c) = *reinterpret_cast<const uint4*>(hk);
    *reinterpret_cast<uint4*>(p.ws.qe + base + r * kD + c) = *reinterpret_cast<const uint4*>(hq);
  }
  if (threadIdx.x < kC) p.ws.gamma[ws_index(p, slot, hv, kC) + threadIdx.x] = sm.gamma[threadIdx.x];
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(IntraSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(intra_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_slots), p.num_v_heads);
  intra_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_intra(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
