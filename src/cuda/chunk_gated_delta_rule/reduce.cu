// dq and dk from per-value-head fp32 gradients left in a workspace ([B * T, HV, K], w.r.t. the
// normalised q and k): the last step of the fused recurrent backward
// (fused_recurrent_gated_delta_rule_backward.cu); the chunked backward sums over the value heads
// inside grads.cu instead. For each row (b, t) and key head h, the group's HV / H value heads are summed in head
// order (fixed: deterministic, no atomics), then, with use_qk_l2norm, backpropagated through
// y = x / sqrt(|x|^2 + eps):  dx = inv (dy - y (y . dy)),  inv = (|x|^2 + eps)^-1/2.
//
// One warp per (row, key head), each lane 4 of the (at most 128) columns; 8 warps per block.
// Memory-bound: reads HV / H + 1 rows of K, writes one, per key head.
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ void reduce_one(const ChunkParams& p, const float* heads, const T* x,
                           const int64_t* x_s, T* dx, const int64_t* dx_s, int64_t b, int64_t t,
                           int h) {
  const int lane = threadIdx.x & 31, K = p.head_k_dim;
  const float* src = heads + ((b * p.seq_len + t) * p.num_v_heads + int64_t(h) * p.group) * K;
  const T* xr = x + b * x_s[0] + t * x_s[1] + h * x_s[2];
  T* out = dx + b * dx_s[0] + t * dx_s[1] + h * dx_s[2];
  float gsum[4], xv[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int d = lane + 32 * j;
    float acc = 0.f;
    if (d < K)
      for (int r = 0; r < p.group; ++r) acc += src[int64_t(r) * K + d];
    gsum[j] = acc;
    xv[j] = d < K ? to_f32(xr[d * x_s[3]]) : 0.f;
  }
  if (p.l2norm) l2norm_backward_row(xv, gsum);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int d = lane + 32 * j;
    if (d < K) out[d * dx_s[3]] = from_f32<T>(gsum[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const ChunkParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t rows = (p.cu_seqlens ? 1 : p.num_seqs) * p.seq_len;
  if (item >= rows * p.num_heads) return;  // whole warps leave together
  const int h = static_cast<int>(item % p.num_heads);
  const int64_t bt = item / p.num_heads, b = bt / p.seq_len, t = bt % p.seq_len;
  const BackwardParams& bw = p.bwd;
  reduce_one<T>(p, bw.dq_heads, static_cast<const T*>(p.q), p.q_s, static_cast<T*>(bw.dq),
                bw.dq_s, b, t, h);
  reduce_one<T>(p, bw.dk_heads, static_cast<const T*>(p.k), p.k_s, static_cast<T*>(bw.dk),
                bw.dk_s, b, t, h);
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const int64_t rows = (p.cu_seqlens ? 1 : p.num_seqs) * p.seq_len * p.num_heads;
  if (rows == 0) return;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  reduce_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_reduce(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
