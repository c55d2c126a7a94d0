// Chunked gated delta rule, CUDA backward, the per-chunk gradients: everything that, once the
// state entering a chunk (S) and the gradient of the state leaving it (dS') are known, depends on
// that chunk alone (launch.cu, above backward(), has the whole picture; the CPU kernel's
// `backward()` has the derivation, line by line, which this kernel follows in the same order).
//
// Per (slot, value head), 256 threads (8 warps), one 64-token chunk. Operands are bf16 tiles in
// shared memory, products run on the tensor cores (mma_tile, fp32 accumulators in one shared
// fp32 tile that each step reuses); row reductions go by warp shuffles and the gate reductions by
// one thread per row, in fixed orders: deterministic.
//   Vn  = U - W S                               (W, U, M, T, gamma from the forward's intra pass)
//   dVn = M^T dO + diag(r) K dS',   dr_i = (K dS')_i . Vn_i
//   dM  = dO Vn^T: dgamma += rows(dM * M) - cols(dM * M);   dMg = dM * Gamma
//   dQ  = diag(e) dO S^T + dMg K,   de_i = (dO S^T)_i . q_i
//   dK  = dMg^T Q + diag(r) Vn dS'^T + diag(b e) T^T dW + dA K + dA^T K
//   dW  = -dVn S^T;  dT = (dVn V^T) diag(b) + (dW K^T) diag(b e)
//   dv  = diag(b) T^T dVn;  dbeta = rows(T^T dVn * V) + e rows(T^T dW * K) + rows(dA * KKg)
//   dA  = -strictLower(T^T dT T^T): dgamma += rows(dA * A) - cols(dA * A);  dA <- dA b Gamma
//   dg  = reverse cumsum of dgamma (+ e de - r dr, + the last row's e_last S.dS' + sum r dr)
// dq, dk go per value head to fp32 rows of the workspace ([B * T, HV, K], dq already times the
// scale); the reduction over a key head's value heads and the l2norm backward follow in
// reduce.cu. dv, dg, dbeta are stored in their tensors' dtypes.
//
// Shared memory: 222 KB (Hopper's 227 KB opt-in; an A100's 163 KB is too small for this
// version). Work per chunk and head: 12 products, ~8.4 M multiply-adds, for ~100 KB read.
#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct GradSmem {
  bf16 q[kC * kLdD];    // normalised, scaled q
  bf16 k[kC * kLdD];    // normalised k
  bf16 dov[kC * kLdD];  // dO, then v
  bf16 wx[kC * kLdD];   // W, then Vn, then dW
  bf16 dvn[kC * kLdD];  // dVn
  bf16 st[kD * kLdD];   // S^T entering the chunk   [v][k]
  bf16 dst[kD * kLdD];  // dS'^T leaving the chunk  [v][k]
  bf16 m[kC * kLdC];    // M, then dM * Gamma
  bf16 t[kC * kLdC];    // T
  bf16 x[kC * kLdC];    // dT, then T^T dT, then dA * b * Gamma
  // One fp32 product tile [64, kLdDf], or two [64, kLdCf] (the second at kC * kLdCf).
  float f[2 * kC * kLdCf];
  float gamma[kC], beta[kC], e[kC], r[kC], dgam[kC], de[kC], dr[kC], dbeta[kC];
  float red[kThreads];
};
static_assert(kC * kLdDf <= 2 * kC * kLdCf, "the fp32 tile holds one [64, 128] product");
static_assert(sizeof(GradSmem) <= 227 * 1024, "over Hopper's shared memory per block");

// Sum over a warp, the same butterfly order on every lane (deterministic).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// S^T or dS'^T of (slot, hv) from the workspace (bf16 [128, 128], rows v) into a tile, zero
// outside v < V, k < K (rows past the state kernels' column tiles are never written).
__device__ __forceinline__ void load_state_tile(const bf16* src, int V, int K, bf16* tile) {
  for (int i = threadIdx.x; i < kD * kD; i += kThreads) {
    const int v = i / kD, k = i % kD;
    tile[v * kLdD + k] = (v < V && k < K) ? src[i] : __float2bfloat16_rn(0.f);
  }
}

// fp32 product tile -> bf16 tile, times `mul`.
__device__ __forceinline__ void to_bf16(const float* f, bf16* tile, float mul) {
  for (int i = threadIdx.x; i < kC * kD; i += kThreads) {
    const int r = i / kD, c = i % kD;
    tile[r * kLdD + c] = __float2bfloat16_rn(mul * f[r * kLdDf + c]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) grads_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  GradSmem& sm = *reinterpret_cast<GradSmem*>(smem_raw);
  const BackwardParams& b = p.bwd;
  const int64_t slot = blockIdx.x;
  const int hv = blockIdx.y, hk = hv / p.group;
  const ChunkRef ch = chunk_of_slot(p, slot);
  if (ch.len == 0) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int K = p.head_k_dim, V = p.head_v_dim;
  float* const f = sm.f;                  // [64, kLdDf]
  float* const f2 = sm.f + kC * kLdCf;    // second [64, kLdCf] tile
  const size_t tile = ws_index(p, slot, hv, kC * kD);
  const size_t small = ws_index(p, slot, hv, kC * kC);
  const size_t state = ws_index(p, slot, hv, kD * kD);

  // ---- loads: workspace tiles by cp.async, inputs converted (and normalised) by the block.
  copy_in_async<kThreads>(p.ws.w + tile, kD, kC, kD, sm.wx, kLdD);
  copy_in_async<kThreads>(p.ws.m + small, kC, kC, kC, sm.m, kLdC);
  copy_in_async<kThreads>(p.ws.t + small, kC, kC, kC, sm.t, kLdC);
  cp_async_commit();
  load_gates(p, ch, hv, sm.gamma, sm.beta);
  load_tile<T, kThreads>(static_cast<const T*>(p.q), p.q_s, ch.batch, ch.t0, ch.len, hk, K,
                         p.l2norm, p.scale, nullptr, sm.q);
  load_tile<T, kThreads>(static_cast<const T*>(p.k), p.k_s, ch.batch, ch.t0, ch.len, hk, K,
                         p.l2norm, 1.f, nullptr, sm.k);
  {
    const int64_t base = ch.batch * b.d_o_s[0] + ch.t0 * b.d_o_s[1] + hv * b.d_o_s[2];
    for (int i = tid; i < kC * kD; i += kThreads) {
      const int r = i / kD, c = i % kD;
      const float x = (r < ch.len && c < V)
                          ? load_float(b.d_o, b.d_o_dtype, base + r * b.d_o_s[1] + c * b.d_o_s[3])
                          : 0.f;
      sm.dov[r * kLdD + c] = __float2bfloat16_rn(x);
    }
  }
  load_state_tile(b.states + state, V, K, sm.st);
  load_state_tile(b.dstates + state, V, K, sm.dst);
  cp_async_wait<0>();
  __syncthreads();
  const float gamma_last = sm.gamma[kC - 1], e_last = __expf(gamma_last);
  if (tid < kC) {
    sm.e[tid] = __expf(sm.gamma[tid]);
    sm.r[tid] = __expf(gamma_last - sm.gamma[tid]);
  }
  // S' = e_last S + ...: d e_last = S . dS' (fixed per-thread pattern, then a fixed tree).
  {
    float acc = 0.f;
    for (int i = tid; i < kD * kD; i += kThreads) {
      const int v = i / kD, k = i % kD;
      acc += __bfloat162float(sm.st[v * kLdD + k]) * __bfloat162float(sm.dst[v * kLdD + k]);
    }
    sm.red[tid] = acc;
  }

  // ---- Vn = U - W S   (B(k, v) = S^T[v][k]: stored transposed)
  mma_tile<kC, kD, kD, false, true, kThreads>(f, kLdDf, sm.wx, kLdD, sm.st, kLdD, false);
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {  // the d e_last tree, beside the products
    if (tid < s) sm.red[tid] += sm.red[tid + s];
    __syncthreads();
  }
  {
    const bf16* u = p.ws.u + tile;
    for (int i = tid; i < kC * kD; i += kThreads) {
      const int r = i / kD, c = i % kD;
      sm.wx[r * kLdD + c] = __float2bfloat16_rn(__bfloat162float(u[i]) - f[r * kLdDf + c]);
    }
  }
  __syncthreads();

  // ---- dVn = diag(r) K dS' + M^T dO;  dr_i = (K dS')_i . Vn_i
  mma_tile<kC, kD, kD, false, true, kThreads>(f, kLdDf, sm.k, kLdD, sm.dst, kLdD, false);
  __syncthreads();
  for (int row = warp; row < kC; row += kWarps) {
    float acc = 0.f;
    const float rr = sm.r[row];
#pragma unroll
    for (int j = 0; j < kD / 32; ++j) {
      const int c = lane + 32 * j;
      float& kds = f[row * kLdDf + c];
      acc += kds * __bfloat162float(sm.wx[row * kLdD + c]);
      kds *= rr;
    }
    acc = warp_sum(acc);
    if (lane == 0) sm.dr[row] = acc;
  }
  __syncthreads();
  mma_tile<kC, kD, kC, true, false, kThreads>(f, kLdDf, sm.m, kLdC, sm.dov, kLdD, true);
  __syncthreads();
  to_bf16(f, sm.dvn, 1.f);
  __syncthreads();

  // ---- dM = dO Vn^T (causal part): gamma's share, then dM * Gamma into m.
  mma_tile<kC, kC, kD, false, true, kThreads>(f, kLdCf, sm.dov, kLdD, sm.wx, kLdD, false);
  __syncthreads();
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    float x = 0.f, dmg = 0.f;
    if (c <= r) {
      const float dm = f[r * kLdCf + c];
      x = dm * __bfloat162float(sm.m[r * kLdC + c]);
      dmg = dm * __expf(sm.gamma[r] - sm.gamma[c]);
    }
    f2[r * kLdCf + c] = x;
    sm.m[r * kLdC + c] = __float2bfloat16_rn(dmg);
  }
  __syncthreads();
  if (tid < kC) {
    float acc = 0.f;
    for (int j = 0; j < kC; ++j) acc += f2[tid * kLdCf + j] - f2[j * kLdCf + tid];
    sm.dgam[tid] = acc;
  }
  __syncthreads();

  // ---- dQ = diag(e) dO S^T + dMg K;  de_i = (dO S^T)_i . q_i   (B(v, k) = S^T[v][k])
  mma_tile<kC, kD, kD, false, false, kThreads>(f, kLdDf, sm.dov, kLdD, sm.st, kLdD, false);
  __syncthreads();
  for (int row = warp; row < kC; row += kWarps) {
    float acc = 0.f;
    const float er = sm.e[row];
#pragma unroll
    for (int j = 0; j < kD / 32; ++j) {
      const int c = lane + 32 * j;
      float& dos = f[row * kLdDf + c];
      acc += dos * __bfloat162float(sm.q[row * kLdD + c]);
      dos *= er;
    }
    acc = warp_sum(acc);
    if (lane == 0) sm.de[row] = acc;
  }
  __syncthreads();
  mma_tile<kC, kD, kC, false, false, kThreads>(f, kLdDf, sm.m, kLdC, sm.k, kLdD, true);
  __syncthreads();
  // Rows of this chunk in the per-value-head [B * T, HV, K] fp32 gradients.
  const int64_t row0 = (ch.batch * p.seq_len + ch.t0) * p.num_v_heads + hv;
  auto head_row = [&](float* base, int r) { return base + (row0 + int64_t(r) * p.num_v_heads) * K; };
  for (int i = tid; i < kC * kD; i += kThreads) {
    const int r = i / kD, c = i % kD;
    if (r < ch.len && c < K) head_row(b.dq_heads, r)[c] = p.scale * f[r * kLdDf + c];
  }
  __syncthreads();

  // ---- dK = dMg^T Q + diag(r) Vn dS'^T   (B(v, k) = dS'^T[v][k])
  mma_tile<kC, kD, kC, true, false, kThreads>(f, kLdDf, sm.m, kLdC, sm.q, kLdD, false);
  __syncthreads();
  for (int i = tid; i < kC * kD; i += kThreads) {
    const int r = i / kD, c = i % kD;
    if (r < ch.len && c < K) head_row(b.dk_heads, r)[c] = f[r * kLdDf + c];
  }
  __syncthreads();
  mma_tile<kC, kD, kD, false, false, kThreads>(f, kLdDf, sm.wx, kLdD, sm.dst, kLdD, false);
  __syncthreads();
  for (int i = tid; i < kC * kD; i += kThreads) {
    const int r = i / kD, c = i % kD;
    if (r < ch.len && c < K) head_row(b.dk_heads, r)[c] += sm.r[r] * f[r * kLdDf + c];
  }
  __syncthreads();

  // ---- dW = -dVn S^T (into wx: Vn is done); v replaces dO.
  mma_tile<kC, kD, kD, false, false, kThreads>(f, kLdDf, sm.dvn, kLdD, sm.st, kLdD, false);
  __syncthreads();
  to_bf16(f, sm.wx, -1.f);
  __syncthreads();
  load_tile<T, kThreads>(static_cast<const T*>(p.v), p.v_s, ch.batch, ch.t0, ch.len, hv, V,
                         false, 1.f, nullptr, sm.dov);

  // ---- dT = (dW K^T) diag(b e) + (dVn V^T) diag(b)
  mma_tile<kC, kC, kD, false, true, kThreads>(f, kLdCf, sm.wx, kLdD, sm.k, kLdD, false);
  __syncthreads();
  for (int i = tid; i < kC * kC; i += kThreads) f[(i / kC) * kLdCf + i % kC] *= sm.e[i % kC];
  __syncthreads();
  mma_tile<kC, kC, kD, false, true, kThreads>(f, kLdCf, sm.dvn, kLdD, sm.dov, kLdD, true);
  __syncthreads();
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    sm.x[r * kLdC + c] = __float2bfloat16_rn(f[r * kLdCf + c] * sm.beta[c]);
  }
  __syncthreads();

  // ---- dVb = T^T dVn: dv = diag(b) dVb, dbeta_i = dVb_i . v_i
  mma_tile<kC, kD, kC, true, false, kThreads>(f, kLdDf, sm.t, kLdC, sm.dvn, kLdD, false);
  __syncthreads();
  {
    T* dv = static_cast<T*>(b.dv) + ch.batch * b.dv_s[0] + ch.t0 * b.dv_s[1] + hv * b.dv_s[2];
    for (int row = warp; row < kC; row += kWarps) {
      float acc = 0.f;
      const float br = sm.beta[row];
#pragma unroll
      for (int j = 0; j < kD / 32; ++j) {
        const int c = lane + 32 * j;
        const float dvb = f[row * kLdDf + c];
        acc += dvb * __bfloat162float(sm.dov[row * kLdD + c]);
        if (row < ch.len && c < V) dv[row * b.dv_s[1] + c * b.dv_s[3]] = from_f32<T>(br * dvb);
      }
      acc = warp_sum(acc);
      if (lane == 0) sm.dbeta[row] = acc;
    }
  }
  __syncthreads();

  // ---- dKb = T^T dW: dk += diag(b e) dKb; dbeta += e dKb.k, de += b dKb.k
  mma_tile<kC, kD, kC, true, false, kThreads>(f, kLdDf, sm.t, kLdC, sm.wx, kLdD, false);
  __syncthreads();
  for (int row = warp; row < kC; row += kWarps) {
    float acc = 0.f;
    const float be = sm.beta[row] * sm.e[row];
#pragma unroll
    for (int j = 0; j < kD / 32; ++j) {
      const int c = lane + 32 * j;
      const float dkb = f[row * kLdDf + c];
      acc += dkb * __bfloat162float(sm.k[row * kLdD + c]);
      if (row < ch.len && c < K) head_row(b.dk_heads, row)[c] += be * dkb;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      sm.dbeta[row] += sm.e[row] * acc;
      sm.de[row] += sm.beta[row] * acc;
    }
  }
  __syncthreads();

  // ---- dA = -T^T dT T^T (strictly lower), with KKg = Gamma * K K^T beside it
  mma_tile<kC, kC, kC, true, false, kThreads>(f2, kLdCf, sm.t, kLdC, sm.x, kLdC, false);
  __syncthreads();
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    sm.x[r * kLdC + c] = __float2bfloat16_rn(f2[r * kLdCf + c]);
  }
  __syncthreads();
  mma_tile<kC, kC, kC, false, true, kThreads>(f2, kLdCf, sm.x, kLdC, sm.t, kLdC, false);
  mma_tile<kC, kC, kD, false, true, kThreads>(f, kLdCf, sm.k, kLdD, sm.k, kLdD, false);
  __syncthreads();
  // A_ij = b_i Gamma_ij k_i.k_j: f <- dA * KKg (beta's share), f2 <- dA * A (gamma's share),
  // x <- dA b_i Gamma_ij (the gradient of k_i.k_j).
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    float db = 0.f, dg = 0.f, dkk = 0.f;
    if (c < r) {
      const float gate = __expf(sm.gamma[r] - sm.gamma[c]);
      const float da = -f2[r * kLdCf + c];
      const float kkg = gate * f[r * kLdCf + c];
      db = da * kkg;
      dg = db * sm.beta[r];
      dkk = da * sm.beta[r] * gate;
    }
    f[r * kLdCf + c] = db;
    f2[r * kLdCf + c] = dg;
    sm.x[r * kLdC + c] = __float2bfloat16_rn(dkk);
  }
  __syncthreads();
  if (tid < kC) {
    float db = 0.f, dg = 0.f;
    for (int j = 0; j < kC; ++j) {
      db += f[tid * kLdCf + j];
      dg += f2[tid * kLdCf + j] - f2[j * kLdCf + tid];
    }
    sm.dbeta[tid] += db;
    sm.dgam[tid] += dg;
  }
  __syncthreads();

  // ---- dk += dA K + dA^T K
  mma_tile<kC, kD, kC, false, false, kThreads>(f, kLdDf, sm.x, kLdC, sm.k, kLdD, false);
  __syncthreads();
  mma_tile<kC, kD, kC, true, false, kThreads>(f, kLdDf, sm.x, kLdC, sm.k, kLdD, true);
  __syncthreads();
  for (int i = tid; i < kC * kD; i += kThreads) {
    const int r = i / kD, c = i % kD;
    if (r < ch.len && c < K) head_row(b.dk_heads, r)[c] += f[r * kLdDf + c];
  }

  // ---- gamma: e_i = exp(gamma_i), r_i = exp(gamma_last - gamma_i), e_last; dg = reverse cumsum
  if (tid < kC) sm.dgam[tid] += sm.de[tid] * sm.e[tid] - sm.dr[tid] * sm.r[tid];
  __syncthreads();
  if (tid == 0) {
    float dlast = sm.red[0] * e_last;
    for (int i = 0; i < kC; ++i) dlast += sm.dr[i] * sm.r[i];
    sm.dgam[kC - 1] += dlast;
    for (int i = kC - 2; i >= 0; --i) sm.dgam[i] += sm.dgam[i + 1];
  }
  __syncthreads();
  if (tid < ch.len) {
    const int64_t row = ch.batch * b.dg_s[0] + (ch.t0 + tid) * b.dg_s[1] + hv * b.dg_s[2];
    store_float(b.dg, b.dg_dtype, row, sm.dgam[tid]);
    const int64_t brow =
        ch.batch * b.dbeta_s[0] + (ch.t0 + tid) * b.dbeta_s[1] + hv * b.dbeta_s[2];
    store_float(b.dbeta, b.dbeta_dtype, brow, sm.dbeta[tid]);
  }
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(GradSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
      grads_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_slots), p.num_v_heads);
  grads_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void check_grads_device() {
  const int optin = device_info().max_smem_per_block_optin;
  if (static_cast<size_t>(optin) < sizeof(GradSmem))
    fail(Error::Kind::kNotImplemented, "chunk_gated_delta_rule: the CUDA backward needs ",
         sizeof(GradSmem), " bytes of shared memory per block (Hopper); this device offers ",
         optin);
}

void launch_grads(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
