// Token-by-token gated delta rule on the GPU, forward (the decode path).
//
// Per (sequence n, value head hv), per token, with a = exp(g), q scaled (and l2-normalised):
//   S <- a S;  u = S^T k;  delta = beta (v - u);  S <- S + k delta^T;  o = S^T q
// Launch: grid (ceil(V / 32), N * HV), 128 threads (4 warps). A block owns 32 columns of the
// [K, V] fp32 state, kept in registers for the whole sequence: a lane holds 4 adjacent columns
// (16-byte loads and stores; 8 lanes cover the 32 columns, so a warp access covers 4 rows) of
// K / 16 rows. The state is read once (initial_state, or zeros) and written once (final_state);
// u and o are column sums over K: per-thread partial sums, shuffles across the lanes of one
// access, then the 4 warps' partials through shared memory (fixed order: deterministic). q and k
// go through shared memory once per token. Memory-bound at decode shapes: the floor is one read
// and one write of the state. States whose rows are not 16-byte aligned take the same kernel
// with one column per lane.
// Assumes: K <= 4 * kRows (kRows in {16, 32, 64}: K <= 256), any V, any strides, varlen offsets
// on the device (no host synchronisation). Backward: fused_recurrent_gated_delta_rule_backward.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/convert.cuh"
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

// kRows bounds K / 4 (rows per warp); kVec columns per lane: 4 = 16-byte state accesses (8 lanes
// span a 32-column row segment, a warp covers 4 rows per access), 1 = 4-byte accesses for states
// whose rows are not 16-byte aligned (32 lanes per row segment).
template <typename T, int kRows, int kVec>
__global__ void __launch_bounds__(kThreads)
    fused_recurrent_forward_kernel(const Params p) {
  constexpr int kLanesPerRow = kColumns / kVec;  // 8 or 32
  constexpr int kRowsPerAccess = kVec;           // rows a warp touches per access
  constexpr int kSteps = kRows / kVec;           // state rows per thread
  __shared__ float q_s[4 * kRows], k_s[4 * kRows];
  __shared__ float partial[kWarps][kColumns];
  __shared__ float red[kWarps];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / kLanesPerRow;              // row within one access
  const int c0 = (lane % kLanesPerRow) * kVec;      // first column within the block's 32
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int col = blockIdx.x * kColumns + c0;       // first global column of this lane
  const int n = blockIdx.y / p.num_v_heads, hv = blockIdx.y % p.num_v_heads;
  const int hk = hv / p.group;
  auto row_of = [&](int r) { return (r * kWarps + warp) * kRowsPerAccess + sub; };

  int64_t batch = n, begin = 0, end = p.seq_len;
  if (p.cu_seqlens) {
    batch = 0;
    begin = p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[n]
                            : static_cast<const int32_t*>(p.cu_seqlens)[n];
    end = p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[n + 1]
                          : static_cast<const int32_t*>(p.cu_seqlens)[n + 1];
  }

  float S[kSteps][kVec];
#pragma unroll
  for (int r = 0; r < kSteps; ++r) {
    const int row = row_of(r);
    const float* src = p.initial_state
                           ? p.initial_state + n * p.h0_s[0] + hv * p.h0_s[1] + row * p.h0_s[2]
                           : nullptr;
    if constexpr (kVec == 4) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (src && row < K && col < V) x = *reinterpret_cast<const float4*>(src + col);
      S[r][0] = x.x, S[r][1] = x.y, S[r][2] = x.z, S[r][3] = x.w;
    } else {
      S[r][0] = (src && row < K && col < V) ? src[col * p.h0_s[3]] : 0.f;
    }
  }

  const T* q = static_cast<const T*>(p.q) + batch * p.q_s[0] + hk * p.q_s[2];
  const T* k = static_cast<const T*>(p.k) + batch * p.k_s[0] + hk * p.k_s[2];
  const T* v = static_cast<const T*>(p.v) + batch * p.v_s[0] + hv * p.v_s[2];
  T* o = static_cast<T*>(p.o) + batch * p.o_s[0] + hv * p.o_s[2];
  const int64_t g_base = batch * p.g_s[0] + hv * p.g_s[2];
  const int64_t b_base = batch * p.beta_s[0] + hv * p.beta_s[2];

  // Sum over the block's K rows of one value per (thread, column j): lanes of one access first
  // (shuffles), then the 4 warps (shared memory, fixed order). Returns the column's total.
  auto column_sum = [&](float (&x)[kVec], float (&total)[kVec]) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      for (int off = kLanesPerRow; off < 32; off <<= 1)
        x[j] += __shfl_xor_sync(0xffffffffu, x[j], off);
    }
    if (sub == 0) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) partial[warp][c0 + j] = x[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      total[j] = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total[j] += partial[w][c0 + j];
    }
    __syncthreads();  // partial is reused by the next sum
  };

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
    const float a = __expf(load_float(p.g, p.g_dtype, g_base + t * p.g_s[1]));
    const float b = load_float(p.beta, p.beta_dtype, b_base + t * p.beta_s[1]);

    float u[kVec], u_total[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) u[j] = 0.f;
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      const float kr = k_s[row_of(r)];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        S[r][j] *= a;
        u[j] += kr * S[r][j];
      }
    }
    column_sum(u, u_total);
    float kd[kVec], out[kVec], out_total[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float vj = col + j < V ? to_f32(v[t * p.v_s[1] + (col + j) * p.v_s[3]]) : 0.f;
      kd[j] = k_mul * b * (vj - u_total[j] * k_mul);  // k_mul * delta
      out[j] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      const float kr = k_s[row_of(r)], qr = q_s[row_of(r)];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        S[r][j] += kr * kd[j];
        out[j] += qr * S[r][j];
      }
    }
    column_sum(out, out_total);
    if (warp == 0 && sub == 0) {
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        if (col + j < V) o[t * p.o_s[1] + (col + j) * p.o_s[3]] = from_f32<T>(out_total[j] * q_mul);
    }
  }

  if (p.final_state) {
#pragma unroll
    for (int r = 0; r < kSteps; ++r) {
      const int row = row_of(r);
      if (row >= K || col >= V) continue;
      float* dst = p.final_state + n * p.ht_s[0] + hv * p.ht_s[1] + row * p.ht_s[2];
      if constexpr (kVec == 4) {
        *reinterpret_cast<float4*>(dst + col) = make_float4(S[r][0], S[r][1], S[r][2], S[r][3]);
      } else {
        dst[col * p.ht_s[3]] = S[r][0];
      }
    }
  }
}

template <typename T, int kVec>
void launch_for_vec(const Params& p, const dim3& grid, cudaStream_t stream) {
  if (p.head_k_dim <= 64) {
    fused_recurrent_forward_kernel<T, 16, kVec><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.head_k_dim <= 128) {
    fused_recurrent_forward_kernel<T, 32, kVec><<<grid, kThreads, 0, stream>>>(p);
  } else {
    fused_recurrent_forward_kernel<T, 64, kVec><<<grid, kThreads, 0, stream>>>(p);
  }
}

// 16-byte state accesses need V % 4 == 0 and every state row 16-byte aligned.
bool state_rows_aligned(const TensorRef& t) {
  if (!t.defined()) return true;
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  return t.strides[3] == 1 && addr % 16 == 0 && t.strides[0] % 4 == 0 && t.strides[1] % 4 == 0 &&
         t.strides[2] % 4 == 0;
}

template <typename T>
void launch_for_dtype(const Params& p, bool vec4, int64_t num_seqs, cudaStream_t stream) {
  const dim3 grid((p.head_v_dim + kColumns - 1) / kColumns, num_seqs * p.num_v_heads);
  if (vec4) launch_for_vec<T, 4>(p, grid, stream);
  else launch_for_vec<T, 1>(p, grid, stream);
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

  const bool vec4 = s.head_v_dim % 4 == 0 && state_rows_aligned(in.initial_state) &&
                    state_rows_aligned(out.final_state);
  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  switch (in.q.dtype) {
    case DType::kFloat32: launch_for_dtype<float>(p, vec4, s.num_seqs, stream); break;
    case DType::kFloat16: launch_for_dtype<__half>(p, vec4, s.num_seqs, stream); break;
    case DType::kBFloat16: launch_for_dtype<__nv_bfloat16>(p, vec4, s.num_seqs, stream); break;
    default: fail(Error::Kind::kType, op, ": unsupported dtype on CUDA");
  }
}

}  // namespace

const GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule = {
    no_workspace, fused_recurrent_backward_workspace_bytes, forward, fused_recurrent_backward};

}  // namespace flashdelta::detail::cuda
