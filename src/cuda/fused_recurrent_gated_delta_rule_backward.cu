// Token-by-token gated delta rule on the GPU, backward. Correctness first: fp32 throughout, the
// CPU kernel's algorithm (src/cpu/fused_recurrent_gated_delta_rule.cpp), one block per sequence
// and value head; the op is the decode path, where gradients are rare.
//
// Per token, with a = exp(g), q scaled and (optionally) normalised, S_prev the incoming state:
//   forward   S_a = a S_prev;  u = S_a^T k;  delta = b (v - u);  S = S_a + k delta^T;  o = S^T q
//   backward  dS += q do^T                                  (o)
//             dq  = S do = a S_prev do + k (delta . do)
//             ddelta = dS^T k;  dv = b ddelta;  db = ddelta . (v - u);  du = -b ddelta
//             dk  = dS delta + a S_prev du                  (S's update and u)
//             dS_a = dS + k du^T;  dg = a (S_prev . dS_a);  dS <- a dS_a
// Pass 1 replays the sequence and stores the state entering every block of kBlock tokens
// (fp32, workspace slots as the CPU backend's). Pass 2 walks the blocks in reverse; for token j
// of a block it reloads the block's state and steps forward j tokens to get S_prev (kBlock^2 / 2
// steps per block, no per-token history), then takes the backward step. dq / dk go per value
// head to fp32 rows of the workspace and are reduced over each key head's value heads (and
// through the l2-normalisation) by the chunked op's reduce kernel.
//
// Launch: grid N * HV, 256 threads. S and dS live in shared memory, [K][V] with row stride 129
// (column sums read rows across threads, row sums columns: both conflict-free), 132 KB.
// Column sums over K: thread (v, half) adds rows half, half + 2, ..., then the two halves in
// order; row sums over V likewise with (k, half). Every sum has a fixed order: deterministic.
// Assumes K, V <= 128 (checked), any strides, varlen offsets on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/convert.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxDim = 128;        // K and V
constexpr int kLd = kMaxDim + 1;    // row stride of S and dS in shared memory
constexpr int64_t kBlock = 16;      // tokens per stored state
constexpr float kL2NormEps = 1e-6f;

struct BackwardParams {
  const void *q, *k, *v, *g, *beta, *d_o;
  DType g_dtype, beta_dtype, d_o_dtype, dg_dtype, dbeta_dtype;
  int64_t q_s[4], k_s[4], v_s[4], g_s[3], beta_s[3], d_o_s[4];
  const float* initial_state;  // or nullptr (zeros)
  const float* d_final_state;  // or nullptr (zeros)
  float* d_initial_state;      // or nullptr (not wanted)
  int64_t h0_s[4], dht_s[4], dh0_s[4];
  void *dv, *dg, *dbeta;
  int64_t dv_s[4], dg_s[3], dbeta_s[3];
  float* states;               // [slots, HV, K, V]
  float *dq_heads, *dk_heads;  // [B * T, HV, K]
  const void* cu_seqlens;      // nullptr: not varlen
  bool cu_seqlens_64;
  int64_t seq_len;
  int num_v_heads, head_k_dim, head_v_dim, group;
  float scale;
  bool l2norm;
};

struct Smem {
  float S[kMaxDim * kLd];
  float dS[kMaxDim * kLd];
  float q[kMaxDim], k[kMaxDim], v[kMaxDim], d_o[kMaxDim];
  float u[kMaxDim], delta[kMaxDim], ddelta[kMaxDim], du[kMaxDim];
  float part[3][2][kMaxDim];  // per-half partial sums
  float red[kWarps];
  float scalars[4];           // a, b
};

__device__ __forceinline__ int64_t offset_of(const BackwardParams& p, int64_t i) {
  return p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[i]
                         : static_cast<const int32_t*>(p.cu_seqlens)[i];
}

// Sum of one value per thread over the block, every thread gets it (fixed order).
__device__ __forceinline__ float block_sum(float x, float* red) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename T>
struct Token {
  const BackwardParams& p;
  Smem& sm;
  int64_t batch;
  int hv, hk;

  // q (normalised, scaled; only with_grad), k (normalised), v, d_o (only with_grad) of token t
  // into shared memory, a = exp(g) and b into sm.scalars. Ends with a barrier.
  __device__ void load(int64_t t, bool with_grad) {
    const int tid = threadIdx.x, K = p.head_k_dim, V = p.head_v_dim;
    float qx = 0.f, kx = 0.f;
    if (tid < K) {
      kx = to_f32(static_cast<const T*>(p.k)[batch * p.k_s[0] + t * p.k_s[1] + hk * p.k_s[2] +
                                             tid * p.k_s[3]]);
      if (with_grad)
        qx = to_f32(static_cast<const T*>(p.q)[batch * p.q_s[0] + t * p.q_s[1] + hk * p.q_s[2] +
                                               tid * p.q_s[3]]);
    }
    float q_mul = p.scale, k_mul = 1.f;
    if (p.l2norm) {
      k_mul = rsqrtf(block_sum(kx * kx, sm.red) + kL2NormEps);
      if (with_grad) q_mul *= rsqrtf(block_sum(qx * qx, sm.red) + kL2NormEps);
    }
    if (tid < kMaxDim) {
      sm.k[tid] = kx * k_mul;
      sm.q[tid] = qx * q_mul;
      const bool in_v = tid < V;
      sm.v[tid] = in_v ? to_f32(static_cast<const T*>(p.v)[batch * p.v_s[0] + t * p.v_s[1] +
                                                            hv * p.v_s[2] + tid * p.v_s[3]])
                       : 0.f;
      sm.d_o[tid] = in_v && with_grad
                        ? load_float(p.d_o, p.d_o_dtype, batch * p.d_o_s[0] + t * p.d_o_s[1] +
                                                             hv * p.d_o_s[2] + tid * p.d_o_s[3])
                        : 0.f;
    }
    if (tid == 0) {
      sm.scalars[0] =
          __expf(load_float(p.g, p.g_dtype, batch * p.g_s[0] + t * p.g_s[1] + hv * p.g_s[2]));
      sm.scalars[1] =
          load_float(p.beta, p.beta_dtype, batch * p.beta_s[0] + t * p.beta_s[1] + hv * p.beta_s[2]);
    }
    __syncthreads();
  }

  // u = a S^T k and delta = b (v - u) from S (= S_prev) and the loaded token. Ends with a barrier.
  __device__ void delta_rule() {
    const int tid = threadIdx.x, col = tid % kMaxDim, half = tid / kMaxDim;
    const int K = p.head_k_dim;
    float acc = 0.f;
    for (int r = half; r < K; r += 2) acc += sm.S[r * kLd + col] * sm.k[r];
    sm.part[0][half][col] = acc;
    __syncthreads();
    if (tid < kMaxDim) {
      const float a = sm.scalars[0], b = sm.scalars[1];
      const float u = a * (sm.part[0][0][tid] + sm.part[0][1][tid]);
      sm.u[tid] = u;
      sm.delta[tid] = b * (sm.v[tid] - u);
    }
    __syncthreads();
  }

  // S <- a S + k delta^T (after delta_rule()). Ends with a barrier.
  __device__ void advance() {
    const int tid = threadIdx.x, col = tid % kMaxDim, half = tid / kMaxDim;
    const float a = sm.scalars[0], d = sm.delta[col];
    for (int r = half; r < p.head_k_dim; r += 2) {
      float& s = sm.S[r * kLd + col];
      s = a * s + sm.k[r] * d;
    }
    __syncthreads();
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) fused_recurrent_backward_kernel(
    const BackwardParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int64_t n = blockIdx.x / p.num_v_heads;
  const int hv = static_cast<int>(blockIdx.x % p.num_v_heads);
  const int tid = threadIdx.x, col = tid % kMaxDim, half = tid / kMaxDim;
  const int K = p.head_k_dim, V = p.head_v_dim;

  int64_t batch = n, begin = 0, end = p.seq_len, first_slot = n * ((p.seq_len + kBlock - 1) / kBlock);
  if (p.cu_seqlens) {
    batch = 0, begin = offset_of(p, n), end = offset_of(p, n + 1);
    first_slot = begin / kBlock + n;
  }
  const int64_t num_blocks = (end - begin + kBlock - 1) / kBlock;
  Token<T> tok{p, sm, batch, hv, hv / p.group};
  const size_t KV = static_cast<size_t>(K) * V;
  auto slot_state = [&](int64_t c) {
    return p.states + (static_cast<size_t>(first_slot + c) * p.num_v_heads + hv) * KV;
  };
  // Element e of a thread's share of a [K][V] matrix: row r = half + 2 i, column col.
  auto load_matrix = [&](float* dst, const float* src, const int64_t* s) {
    for (int r = half; r < kMaxDim; r += 2) {
      float x = 0.f;
      if (src && r < K && col < V) x = s ? src[r * s[0] + col * s[1]] : src[r * V + col];
      dst[r * kLd + col] = x;
    }
  };

  // Pass 1: replay, storing the state entering each block.
  {
    const int64_t s2[2] = {p.h0_s[2], p.h0_s[3]};
    load_matrix(sm.S, p.initial_state ? p.initial_state + n * p.h0_s[0] + hv * p.h0_s[1] : nullptr,
                s2);
  }
  __syncthreads();
  for (int64_t c = 0; c < num_blocks; ++c) {
    float* st = slot_state(c);
    for (int r = half; r < K; r += 2)
      if (col < V) st[r * V + col] = sm.S[r * kLd + col];
    if (c + 1 == num_blocks) break;  // the last block's outgoing state is not needed
    for (int64_t t = begin + c * kBlock; t < begin + (c + 1) * kBlock; ++t) {
      tok.load(t, false);
      tok.delta_rule();
      tok.advance();
    }
  }

  // Pass 2: tokens in reverse, dS in shared memory.
  {
    const int64_t s2[2] = {p.dht_s[2], p.dht_s[3]};
    load_matrix(sm.dS,
                p.d_final_state ? p.d_final_state + n * p.dht_s[0] + hv * p.dht_s[1] : nullptr, s2);
  }
  for (int64_t c = num_blocks - 1; c >= 0; --c) {
    const int64_t t0 = begin + c * kBlock;
    const int len = static_cast<int>(end - t0 < kBlock ? end - t0 : kBlock);
    for (int j = len - 1; j >= 0; --j) {
      __syncthreads();  // the previous token's readers of S are done
      load_matrix(sm.S, slot_state(c), nullptr);
      __syncthreads();
      for (int i = 0; i < j; ++i) {
        tok.load(t0 + i, false);
        tok.delta_rule();
        tok.advance();
      }
      const int64_t t = t0 + j;
      tok.load(t, true);
      tok.delta_rule();  // u, delta of token t from S = S_prev
      const float a = sm.scalars[0], b = sm.scalars[1];

      // dS += q do^T;  ddelta = dS^T k
      {
        float acc = 0.f;
        const float dov = sm.d_o[col];
        for (int r = half; r < K; r += 2) {
          float& ds = sm.dS[r * kLd + col];
          ds += sm.q[r] * dov;
          acc += ds * sm.k[r];
        }
        sm.part[0][half][col] = acc;
      }
      __syncthreads();
      float db_part = 0.f, dd_part = 0.f;
      if (tid < kMaxDim) {
        const float dd = sm.part[0][0][tid] + sm.part[0][1][tid];
        sm.ddelta[tid] = dd;
        sm.du[tid] = -b * dd;
        if (tid < V) {
          db_part = dd * (sm.v[tid] - sm.u[tid]);
          dd_part = sm.delta[tid] * sm.d_o[tid];
          T* dv = static_cast<T*>(p.dv);
          dv[batch * p.dv_s[0] + t * p.dv_s[1] + hv * p.dv_s[2] + tid * p.dv_s[3]] =
              from_f32<T>(b * dd);
        }
      }
      const float db = block_sum(db_part, sm.red);        // has barriers: du is visible after
      const float delta_do = block_sum(dd_part, sm.red);

      // Row sums over V: S_prev do, S_prev du, dS delta (thread (row, half of the columns)).
      {
        const int row = tid % kMaxDim;
        float sdo = 0.f, sdu = 0.f, dsd = 0.f;
        if (row < K) {
          for (int v = half; v < V; v += 2) {
            const float s = sm.S[row * kLd + v];
            sdo += s * sm.d_o[v];
            sdu += s * sm.du[v];
            dsd += sm.dS[row * kLd + v] * sm.delta[v];
          }
        }
        sm.part[0][half][row] = sdo;
        sm.part[1][half][row] = sdu;
        sm.part[2][half][row] = dsd;
      }
      __syncthreads();
      if (tid < K) {
        const int64_t head_row = ((batch * p.seq_len + t) * p.num_v_heads + hv) * K + tid;
        const float sdo = sm.part[0][0][tid] + sm.part[0][1][tid];
        const float sdu = sm.part[1][0][tid] + sm.part[1][1][tid];
        const float dsd = sm.part[2][0][tid] + sm.part[2][1][tid];
        p.dq_heads[head_row] = p.scale * (a * sdo + sm.k[tid] * delta_do);  // w.r.t. normalised q
        p.dk_heads[head_row] = dsd + a * sdu;
      }

      // dS_a = dS + k du^T;  dg = a (S_prev . dS_a);  dS <- a dS_a
      float da_part = 0.f;
      {
        const float du = sm.du[col];
        for (int r = half; r < K; r += 2) {
          float& ds = sm.dS[r * kLd + col];
          const float dsa = ds + sm.k[r] * du;
          if (col < V) da_part += sm.S[r * kLd + col] * dsa;
          ds = a * dsa;
        }
      }
      const float da = block_sum(da_part, sm.red);
      if (tid == 0) {
        store_float(p.dg, p.dg_dtype, batch * p.dg_s[0] + t * p.dg_s[1] + hv * p.dg_s[2], a * da);
        store_float(p.dbeta, p.dbeta_dtype,
                    batch * p.dbeta_s[0] + t * p.dbeta_s[1] + hv * p.dbeta_s[2], db);
      }
    }
  }
  __syncthreads();
  if (p.d_initial_state) {
    float* dh0 = p.d_initial_state + n * p.dh0_s[0] + hv * p.dh0_s[1];
    for (int r = half; r < K; r += 2)
      if (col < V) dh0[r * p.dh0_s[2] + col * p.dh0_s[3]] = sm.dS[r * kLd + col];
  }
}

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

int64_t num_slots(const GatedDeltaRuleShape& s) {
  if (s.varlen) return s.seq_len / kBlock + s.num_seqs;
  return s.batch * ((s.seq_len + kBlock - 1) / kBlock);
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

void check_supported(const GatedDeltaRuleShape& s) {
  const char* op = "fused_recurrent_gated_delta_rule";
  if (s.head_k_dim > kMaxDim || s.head_v_dim > kMaxDim)
    fail(Error::Kind::kNotImplemented, op,
         ": the CUDA backward supports head dimensions up to 128, got K = ", s.head_k_dim,
         ", V = ", s.head_v_dim);
  check_value(s.num_seqs * s.num_v_heads <= 0x7fffffff, op,
              ": the CUDA backward supports N * HV < 2^31");
}

// states [slots, HV, K, V] fp32, then dq and dk per value head [B * T, HV, K] fp32.
struct Layout {
  size_t states, heads;
};

Layout layout(const GatedDeltaRuleShape& s) {
  return {align_up(static_cast<size_t>(num_slots(s)) * s.num_v_heads * s.head_k_dim *
                   s.head_v_dim * sizeof(float)),
          align_up(static_cast<size_t>(s.batch) * s.seq_len * s.num_v_heads * s.head_k_dim *
                   sizeof(float))};
}

}  // namespace

size_t fused_recurrent_backward_workspace_bytes(const GatedDeltaRuleShape& s,
                                                const GatedDeltaRuleInputs&) {
  check_supported(s);
  const Layout l = layout(s);
  return l.states + 2 * l.heads;
}

void fused_recurrent_backward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                              const GatedDeltaRuleBackwardInputs& gin,
                              const GatedDeltaRuleBackwardOutputs& gout) {
  check_supported(s);
  if (s.num_seqs == 0) return;
  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  const Layout l = layout(s);
  auto* ws = static_cast<unsigned char*>(gout.workspace.data);

  BackwardParams p{};
  p.q = in.q.data, p.k = in.k.data, p.v = in.v.data, p.g = in.g.data, p.beta = in.beta.data;
  p.d_o = gin.d_o.data;
  p.g_dtype = in.g.dtype, p.beta_dtype = in.beta.dtype, p.d_o_dtype = gin.d_o.dtype;
  p.dg_dtype = gout.dg.dtype, p.dbeta_dtype = gout.dbeta.dtype;
  copy_strides(in.q, p.q_s), copy_strides(in.k, p.k_s), copy_strides(in.v, p.v_s);
  copy_strides(in.g, p.g_s), copy_strides(in.beta, p.beta_s), copy_strides(gin.d_o, p.d_o_s);
  if (in.initial_state.defined()) {
    p.initial_state = static_cast<const float*>(in.initial_state.data);
    copy_strides(in.initial_state, p.h0_s);
  }
  if (gin.d_final_state.defined()) {
    p.d_final_state = static_cast<const float*>(gin.d_final_state.data);
    copy_strides(gin.d_final_state, p.dht_s);
  }
  if (gout.d_initial_state.defined()) {
    p.d_initial_state = static_cast<float*>(gout.d_initial_state.data);
    copy_strides(gout.d_initial_state, p.dh0_s);
  }
  p.dv = gout.dv.data, p.dg = gout.dg.data, p.dbeta = gout.dbeta.data;
  copy_strides(gout.dv, p.dv_s), copy_strides(gout.dg, p.dg_s);
  copy_strides(gout.dbeta, p.dbeta_s);
  p.states = reinterpret_cast<float*>(ws);
  p.dq_heads = reinterpret_cast<float*>(ws + l.states);
  p.dk_heads = reinterpret_cast<float*>(ws + l.states + l.heads);
  p.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data : nullptr;
  p.cu_seqlens_64 = in.cu_seqlens.defined() && in.cu_seqlens.dtype == DType::kInt64;
  p.seq_len = s.seq_len;
  p.num_v_heads = static_cast<int>(s.num_v_heads);
  p.head_k_dim = static_cast<int>(s.head_k_dim);
  p.head_v_dim = static_cast<int>(s.head_v_dim);
  p.group = static_cast<int>(s.num_v_heads / s.num_heads);
  p.scale = static_cast<float>(s.scale);
  p.l2norm = in.use_qk_l2norm;

  const unsigned grid = static_cast<unsigned>(s.num_seqs * s.num_v_heads);
  const size_t smem = sizeof(Smem);
  auto run = [&](auto kernel) {
    FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  };
  switch (in.q.dtype) {
    case DType::kFloat32: run(fused_recurrent_backward_kernel<float>); break;
    case DType::kFloat16: run(fused_recurrent_backward_kernel<__half>); break;
    case DType::kBFloat16: run(fused_recurrent_backward_kernel<__nv_bfloat16>); break;
    default: fail(Error::Kind::kType, "fused_recurrent_gated_delta_rule: unsupported dtype on CUDA");
  }

  // dq, dk: the chunked op's reduction over each key head's value heads (and the l2norm).
  chunk::ChunkParams r{};
  r.q = in.q.data, r.k = in.k.data, r.dtype = in.q.dtype;
  copy_strides(in.q, r.q_s), copy_strides(in.k, r.k_s);
  r.cu_seqlens = p.cu_seqlens, r.cu_seqlens_64 = p.cu_seqlens_64;
  r.seq_len = s.seq_len;
  r.num_seqs = static_cast<int>(s.num_seqs);
  r.num_heads = static_cast<int>(s.num_heads);
  r.num_v_heads = p.num_v_heads, r.group = p.group, r.head_k_dim = p.head_k_dim;
  r.l2norm = p.l2norm;
  r.bwd.dq_heads = p.dq_heads, r.bwd.dk_heads = p.dk_heads;
  r.bwd.dq = gout.dq.data, r.bwd.dk = gout.dk.data;
  copy_strides(gout.dq, r.bwd.dq_s), copy_strides(gout.dk, r.bwd.dk_s);
  chunk::launch_reduce(r, stream);
}

}  // namespace flashdelta::detail::cuda
