// Chunked gated delta rule, CUDA, phase 3 of 3: the output of each chunk, in parallel.
//
// Per (slot, value head), 256 threads (8 warps):
//   M = Gamma * causal(Q K^T)                    64 x 64, K = 128 (q normalised and scaled)
//   O = diag(e^gamma) Q S + M Vn                 64 x 128, K = 128 then 64
// with S (the chunk's incoming state) and Vn from phase 2, bf16 operands, fp32 accumulators;
// O is cast to the input dtype and stored with the caller's strides.
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 256;

struct OutputSmem {
  bf16 q[kC * kLdD];
  bf16 k[kC * kLdD];
  bf16 s[kD * kLdD];
  bf16 vn[kC * kLdD];
  float o[kC * kLdDf];
  float m[kC * kLdCf];
  bf16 mb[kC * kLdC];
  float gamma[kC], beta[kC];
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) output_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  OutputSmem& sm = *reinterpret_cast<OutputSmem*>(smem_raw);
  const int64_t slot = blockIdx.x;
  const int hv = blockIdx.y, hk = hv / p.group;
  const ChunkRef ch = chunk_of_slot(p, slot);
  if (ch.len == 0) return;

  // S and Vn stream in (cp.async) while q and k are loaded and normalised.
  copy_in_async<kThreads>(p.ws.s + ws_index(p, slot, hv, kD), kD, kD, kD, sm.s, kLdD);
  copy_in_async<kThreads>(p.ws.vn + ws_index(p, slot, hv, kC), kD, kC, kD, sm.vn, kLdD);
  cp_async_commit();
  load_tile<T, kThreads>(static_cast<const T*>(p.q), p.q_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, p.scale, nullptr, sm.q);
  load_tile<T, kThreads>(static_cast<const T*>(p.k), p.k_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, 1.f, nullptr, sm.k);
  if (threadIdx.x < kC)
    sm.gamma[threadIdx.x] =
        p.ws.gamma[(static_cast<size_t>(slot) * p.num_v_heads + hv) * kC + threadIdx.x];
  cp_async_wait<0>();
  __syncthreads();

  mma_tile<kC, kC, kD, false, true, kThreads>(sm.m, kLdCf, sm.q, kLdD, sm.k, kLdD, false);
  mma_tile<kC, kD, kD, false, false, kThreads>(sm.o, kLdDf, sm.q, kLdD, sm.s, kLdD, false);
  __syncthreads();
  for (int i = threadIdx.x; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    const float x = c <= r ? __expf(sm.gamma[r] - sm.gamma[c]) * sm.m[r * kLdCf + c] : 0.f;
    sm.mb[r * kLdC + c] = __float2bfloat16_rn(x);
  }
  for (int i = threadIdx.x; i < kC * kD; i += kThreads) {
    const int r = i / kD, d = i % kD;
    sm.o[r * kLdDf + d] *= __expf(sm.gamma[r]);
  }
  __syncthreads();
  mma_tile<kC, kD, kC, false, false, kThreads>(sm.o, kLdDf, sm.mb, kLdC, sm.vn, kLdD, true);
  __syncthreads();

  T* o = static_cast<T*>(p.o) + ch.batch * p.o_s[0] + ch.t0 * p.o_s[1] + hv * p.o_s[2];
  for (int i = threadIdx.x; i < kC * kD; i += kThreads) {
    const int r = i / kD, d = i % kD;
    if (r < ch.len && d < p.head_v_dim) o[r * p.o_s[1] + d * p.o_s[3]] = from_f32<T>(sm.o[r * kLdDf + d]);
  }
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(OutputSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(output_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_slots), p.num_v_heads);
  output_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_output(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
