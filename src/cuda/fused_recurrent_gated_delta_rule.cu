// Token-by-token gated delta rule on the GPU, forward (the decode path).
//
// Per (sequence n, value head hv), per token, with a = exp(g), q scaled (and l2-normalised):
//   S <- a S;  u = S^T k;  delta = beta (v - u);  S <- S + k delta^T;  o = S^T q
// Launch: grid (ceil(V / 32), N * HV), 128 threads (4 warps). A block owns 32 columns of the
// [K, V] fp32 state, kept in registers for the whole sequence: lane = column, warp w holds rows
// w, w + 4, w + 8, ... (kRows per thread, a compile-time bound on K / 4). The state is read once
// (initial_state, or zeros) and written once (final_state), each warp access a row segment of
// 32 consecutive floats; u and o are column sums over K: per-thread partial sums, then a sum of
// the 4 warps' partials through shared memory (fixed order: deterministic). q and k go through
// shared memory once per token. Memory-bound at decode shapes: the floor is one read and one
// write of the state.
// Assumes: K <= 4 * kRows (kRows in {16, 32, 64}: K <= 256), any V, any strides, varlen offsets
// on the device (no host synchronisation). Backward: not on the GPU yet (issue 4).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/check.h"
#include "cuda/cuda_check.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kColumns = 32;  // state columns per block
constexpr float kL2NormEps = 1e-6f;

struct Params {
  const void *q, *k, *v, *g, *beta;
  const float* initial_state;  // nullptr: zeros
  float* final_state;          // nullptr: not written
  void* o;
  const void* cu_seqlens;      // nullptr: not varlen
  bool cu_seqlens_64;
  DType g_dtype, beta_dtype;
  int64_t q_s[4], k_s[4], v_s[4], o_s[4], g_s[3], beta_s[3], h0_s[4], ht_s[4];
  int64_t seq_len;
  int num_v_heads, head_k_dim, head_v_dim, group;
  float scale;
  bool l2norm;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// g and beta come in any float dtype (transformers keeps g in fp32 beside bf16 q/k/v).
__device__ __forceinline__ float load_gate(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Sum over the block of one value per thread (all threads get it). `red` holds kWarps floats.
__device__ __forceinline__ float block_sum(float x, float* red) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();  // red may still be read from the previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads)
    fused_recurrent_forward_kernel(const Params p) {
  __shared__ float q_s[4 * kRows], k_s[4 * kRows];
  __shared__ float partial[kWarps][kColumns];
  __shared__ float red[kWarps];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int col = blockIdx.x * kColumns + lane;
  const bool col_ok = col < V;
  const int n = blockIdx.y / p.num_v_heads, hv = blockIdx.y % p.num_v_heads;
  const int hk = hv / p.group;

  int64_t batch = n, begin = 0, end = p.seq_len;
  if (p.cu_seqlens) {
    batch = 0;
    begin = p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[n]
                            : static_cast<const int32_t*>(p.cu_seqlens)[n];
    end = p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[n + 1]
                          : static_cast<const int32_t*>(p.cu_seqlens)[n + 1];
  }

  float S[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = warp + kWarps * r;
    S[r] = (p.initial_state && col_ok && row < K)
               ? p.initial_state[n * p.h0_s[0] + hv * p.h0_s[1] + row * p.h0_s[2] + col * p.h0_s[3]]
               : 0.f;
  }

  const T* q = static_cast<const T*>(p.q) + batch * p.q_s[0] + hk * p.q_s[2];
  const T* k = static_cast<const T*>(p.k) + batch * p.k_s[0] + hk * p.k_s[2];
  const T* v = static_cast<const T*>(p.v) + batch * p.v_s[0] + hv * p.v_s[2];
  T* o = static_cast<T*>(p.o) + batch * p.o_s[0] + hv * p.o_s[2];
  const int64_t g_base = batch * p.g_s[0] + hv * p.g_s[2];
  const int64_t b_base = batch * p.beta_s[0] + hv * p.beta_s[2];

  for (int64_t t = begin; t < end; ++t) {
    // q, k of this token into shared memory (normalised, q scaled).
    float qsq = 0.f, ksq = 0.f;
    for (int i = threadIdx.x; i < 4 * kRows; i += kThreads) {
      const float qi = i < K ? to_f32(q[t * p.q_s[1] + i * p.q_s[3]]) : 0.f;
      const float ki = i < K ? to_f32(k[t * p.k_s[1] + i * p.k_s[3]]) : 0.f;
      q_s[i] = qi;
      k_s[i] = ki;
      qsq += qi * qi;
      ksq += ki * ki;
    }
    float q_mul = p.scale, k_mul = 1.f;
    if (p.l2norm) {
      q_mul *= rsqrtf(block_sum(qsq, red) + kL2NormEps);
      k_mul = rsqrtf(block_sum(ksq, red) + kL2NormEps);
    }
    __syncthreads();  // q_s / k_s complete
    const float a = __expf(load_gate(p.g, p.g_dtype, g_base + t * p.g_s[1]));
    const float b = load_gate(p.beta, p.beta_dtype, b_base + t * p.beta_s[1]);
    const float vc = col_ok ? to_f32(v[t * p.v_s[1] + col * p.v_s[3]]) : 0.f;

    float u = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      S[r] *= a;
      u += k_s[warp + kWarps * r] * S[r];
    }
    partial[warp][lane] = u;
    __syncthreads();
    u = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) u += partial[w][lane];
    const float delta = b * (vc - u * k_mul);
    const float kd = k_mul * delta;
    float out = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      S[r] += k_s[warp + kWarps * r] * kd;
      out += q_s[warp + kWarps * r] * S[r];
    }
    __syncthreads();  // everyone has read partial (u)
    partial[warp][lane] = out;
    __syncthreads();
    if (warp == 0 && col_ok) {
      out = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) out += partial[w][lane];
      o[t * p.o_s[1] + col * p.o_s[3]] = from_f32<T>(out * q_mul);
    }
    __syncthreads();  // partial, q_s, k_s reused by the next token
  }

  if (p.final_state && col_ok) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = warp + kWarps * r;
      if (row < K)
        p.final_state[n * p.ht_s[0] + hv * p.ht_s[1] + row * p.ht_s[2] + col * p.ht_s[3]] = S[r];
    }
  }
}

template <typename T>
void launch_for_dtype(const Params& p, int64_t num_seqs, cudaStream_t stream) {
  const dim3 grid((p.head_v_dim + kColumns - 1) / kColumns, num_seqs * p.num_v_heads);
  if (p.head_k_dim <= 64) {
    fused_recurrent_forward_kernel<T, 16><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.head_k_dim <= 128) {
    fused_recurrent_forward_kernel<T, 32><<<grid, kThreads, 0, stream>>>(p);
  } else {
    fused_recurrent_forward_kernel<T, 64><<<grid, kThreads, 0, stream>>>(p);
  }
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

size_t no_workspace(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&) { return 0; }

void forward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
             const GatedDeltaRuleForwardOutputs& out) {
  const char* op = "fused_recurrent_gated_delta_rule";
  check_value(s.head_k_dim <= 256, op, ": the CUDA kernel supports K <= 256, got K = ",
              s.head_k_dim);
  check_value(s.num_seqs * s.num_v_heads <= 65535, op,
              ": the CUDA kernel supports N * HV <= 65535 (grid y), got ",
              s.num_seqs * s.num_v_heads);
  if (s.num_seqs == 0) return;
  Params p{};
  p.q = in.q.data, p.k = in.k.data, p.v = in.v.data, p.g = in.g.data, p.beta = in.beta.data;
  p.initial_state = in.initial_state.defined() ? static_cast<const float*>(in.initial_state.data)
                                               : nullptr;
  p.final_state = out.final_state.defined() ? static_cast<float*>(out.final_state.data) : nullptr;
  p.o = out.o.data;
  p.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data : nullptr;
  p.cu_seqlens_64 = in.cu_seqlens.defined() && in.cu_seqlens.dtype == DType::kInt64;
  p.g_dtype = in.g.dtype, p.beta_dtype = in.beta.dtype;
  copy_strides(in.q, p.q_s), copy_strides(in.k, p.k_s), copy_strides(in.v, p.v_s);
  copy_strides(out.o, p.o_s), copy_strides(in.g, p.g_s), copy_strides(in.beta, p.beta_s);
  if (in.initial_state.defined()) copy_strides(in.initial_state, p.h0_s);
  if (out.final_state.defined()) copy_strides(out.final_state, p.ht_s);
  p.seq_len = s.seq_len;
  p.num_v_heads = static_cast<int>(s.num_v_heads);
  p.head_k_dim = static_cast<int>(s.head_k_dim);
  p.head_v_dim = static_cast<int>(s.head_v_dim);
  p.group = static_cast<int>(s.num_v_heads / s.num_heads);
  p.scale = static_cast<float>(s.scale);
  p.l2norm = in.use_qk_l2norm;

  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  switch (in.q.dtype) {
    case DType::kFloat32: launch_for_dtype<float>(p, s.num_seqs, stream); break;
    case DType::kFloat16: launch_for_dtype<__half>(p, s.num_seqs, stream); break;
    case DType::kBFloat16: launch_for_dtype<__nv_bfloat16>(p, s.num_seqs, stream); break;
    default: fail(Error::Kind::kType, op, ": unsupported dtype on CUDA");
  }
}

}  // namespace

const GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule = {
    no_workspace, no_workspace, forward, /*backward=*/nullptr};

}  // namespace flashdelta::detail::cuda
