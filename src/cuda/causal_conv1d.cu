// Depthwise causal conv1d (+ SiLU) on the GPU: forward, backward and the decode update.
//
// What it computes (include/flashdelta/causal_conv1d.h), per channel c of sequence b, W taps:
//   pre[t] = bias + sum_{j = 0}^{min(W - 1, t - start(t))} weight[W - 1 - j] * x[t - j]
//   y[t] = silu(pre[t]) or pre[t]
//   dpre[t] = dy[t] * silu'(pre[t]),   dx[t] = sum_j weight[W - 1 - j] dpre[t + j] (same sequence)
//   dweight[W - 1 - j] = sum_t dpre[t] x[t - j],   dbias = sum_t dpre[t]
//
// Memory-bound (W = 4 multiply-adds per element): every kernel reads each input once and writes
// each output once, in fp32 registers in between.
//
// Launch shape (forward and backward): a block is 32 x 4 threads and owns a tile of
// 32 * VEC channels by 4 runs of kRunTokens tokens; grid (channel tiles, token tiles, B).
// Thread (x, y) owns VEC adjacent channels (one 16-byte load per token in the forward, 8-byte in
// the backward, when the channel stride is 1 and the strides and address are aligned: the layout
// of transformers' transposed [B, T, C] view; VEC = 1 otherwise, any strides) and walks its run
// of tokens in order, keeping the previous W - 1 inputs in registers, so x is read once plus a
// W - 1 token halo per run. Loads are issued kUnroll tokens at a time ahead of the arithmetic to
// keep enough bytes in flight.
// Sequence boundaries: the block first writes reach[t] = min(W - 1, t - start(t)) for its tokens
// to shared memory (start by a binary search of cu_seqlens, read on the device: no host sync).
//
// Backward: the thread recomputes pre and dpre for its run plus a W - 1 token look-ahead (dx[t]
// needs dpre up to t + W - 1) and emits dx W - 1 steps behind. The weight and bias gradients are
// summed per thread, then over the block's 4 runs in shared memory (fixed order), and written as
// one fp32 partial per (b, token tile, tap, channel) into the workspace; a second kernel sums the
// partials over (b, tile) in a fixed order: deterministic, no atomics.
//
// Update: one thread per (b, c); reads the S state columns and L new inputs, writes L outputs,
// then shifts the state left by L in place (column L + i is read before position L + i is
// written, and no other thread touches this (b, c)). The decode case (L = 1, S = 4, the state in
// x's dtype with aligned rows: transformers' cache) moves each state row in one access.
//
// Assumes: W in [2, 4] (templates; core checks), grid.y = token tiles <= 65535 and B <= 65535
// (checked), any strides, y / dx not overlapping the inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "core/causal_conv1d_backend.h"
#include "core/check.h"
#include "cuda/cuda_check.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kChannelThreads = 32;  // blockDim.x
constexpr int kRuns = 4;             // blockDim.y: runs of tokens per block
constexpr int kThreads = kChannelThreads * kRuns;
constexpr int kForwardRunTokens = 32;
constexpr int kBackwardRunTokens = 64;  // longer runs: the W - 1 look-ahead is re-read per run
constexpr int kUnroll = 8;              // tokens loaded ahead of the arithmetic
// Bytes per channel pack: 16 in the forward; 8 in the backward, which holds x, dy, dpre, the
// weight and its gradient per channel (16-byte packs there spill registers).
constexpr int kForwardPackBytes = 16;
constexpr int kBackwardPackBytes = 8;
constexpr int kMaxGridYZ = 65535;

struct ConvParams {
  const void* x;
  const void* dy;  // backward only
  void* out;       // y (forward) or dx (backward)
  const void* weight;
  const void* bias;  // nullptr: no bias
  DType param_dtype;  // weight's and bias's
  int64_t x_s[3], dy_s[3], out_s[3];
  int64_t weight_s[2], bias_s;
  const void* cu_seqlens;  // nullptr: not varlen
  bool cu_seqlens_64;
  int64_t cu_seqlens_stride, num_offsets;  // N + 1
  int64_t channels, seq_len;
  int64_t num_tiles;  // token tiles per sequence row (grid.y)
  float* partials;    // backward: [B * num_tiles, W + 1, C]
  bool silu;
  bool round_x;       // x is wider than weight: cast it to weight's dtype first
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

// Weight, bias and conv_state come in any float dtype.
__device__ __forceinline__ float load_any(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// v rounded to `dtype` and back. transformers runs the convolution in weight's dtype (x cast to
// it) and casts the result to x's dtype; rounding where it holds a value in weight's dtype makes
// bf16 results equal to its own, bit for bit or nearly (an fp32 weight: no rounding at all).
__device__ __forceinline__ float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(__float2half_rn(v));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return v;
  }
}

// VEC adjacent channels of one token, loaded or stored as one access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* __restrict__ base, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_f32(base[0]);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(base);  // channel stride 1
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = to_f32(pk.v[v]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ base, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    base[0] = from_f32<T>(in[0]);
  } else {
    Pack<T, VEC> pk;
#pragma unroll
    for (int v = 0; v < VEC; ++v) pk.v[v] = from_f32<T>(in[v]);
    *reinterpret_cast<Pack<T, VEC>*>(base) = pk;
  }
}

// x values as the convolution takes them (cast to weight's dtype when that is narrower).
template <typename T, int VEC>
__device__ __forceinline__ void load_input(const ConvParams& p, const T* __restrict__ base,
                                           float (&out)[VEC]) {
  load_pack<T, VEC>(base, out);
  if (p.round_x) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = round_to(p.param_dtype, out[v]);
  }
}

// The first token of t's sequence: the last cu_seqlens offset <= t (offset 0 is 0).
__device__ __forceinline__ int64_t sequence_start(const ConvParams& p, int64_t t) {
  auto offset = [&](int64_t i) -> int64_t {
    return p.cu_seqlens_64
               ? static_cast<const int64_t*>(p.cu_seqlens)[i * p.cu_seqlens_stride]
               : static_cast<const int32_t*>(p.cu_seqlens)[i * p.cu_seqlens_stride];
  };
  int64_t lo = 0, hi = p.num_offsets - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (offset(mid) <= t) lo = mid;
    else hi = mid - 1;
  }
  return offset(lo);
}

// reach[i] = how many earlier inputs token tile0 + i may see (<= W - 1), for `count` tokens.
template <int W>
__device__ __forceinline__ void fill_reach(const ConvParams& p, int64_t tile0, int count,
                                           int* reach) {
  const int tid = threadIdx.y * kChannelThreads + threadIdx.x;
  for (int i = tid; i < count; i += kThreads) {
    const int64_t t = tile0 + i;
    const int64_t start = p.cu_seqlens ? sequence_start(p, t) : 0;
    const int64_t r = t - start;
    reach[i] = static_cast<int>(r < W - 1 ? (r < 0 ? 0 : r) : W - 1);
  }
  __syncthreads();
}

template <int W, int VEC>
__device__ __forceinline__ void load_params(const ConvParams& p, int64_t c0, float (&w)[W][VEC],
                                            float (&bias)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t c = c0 + v;
#pragma unroll
    for (int k = 0; k < W; ++k)
      w[k][v] = load_any(p.weight, p.param_dtype, c * p.weight_s[0] + k * p.weight_s[1]);
    bias[v] = p.bias ? load_any(p.bias, p.param_dtype, c * p.bias_s) : 0.f;
  }
}

// expf, not __expf: fp32 results are held to 1e-6 of transformers' (the cost hides under memory).
__device__ __forceinline__ float silu_f(float v) { return v / (1.f + expf(-v)); }

// d silu(v) / dv = s (1 + v (1 - s)), s = sigmoid(v)
__device__ __forceinline__ float silu_grad(float v) {
  const float s = 1.f / (1.f + expf(-v));
  return s * (1.f + v * (1.f - s));
}

template <typename T, int W, int VEC>
__global__ void __launch_bounds__(kThreads)
    causal_conv1d_forward_kernel(const ConvParams p) {
  constexpr int kTileTokens = kRuns * kForwardRunTokens;
  __shared__ int reach[kTileTokens];
  const int64_t b = blockIdx.z;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  fill_reach<W>(p, tile0, kTileTokens, reach);

  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kChannelThreads + threadIdx.x) * VEC;
  const int64_t t0 = tile0 + threadIdx.y * kForwardRunTokens;
  const int64_t t1 = min(t0 + kForwardRunTokens, p.seq_len);
  if (c0 >= p.channels || t0 >= t1) return;  // no barrier below

  float w[W][VEC], bias[VEC];
  load_params<W, VEC>(p, c0, w, bias);
  const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_s[0] + c0 * p.x_s[1];
  T* __restrict__ y = static_cast<T*>(p.out) + b * p.out_s[0] + c0 * p.out_s[1];

  // win[j - 1] = x[t - j], j = 1 .. W - 1 (zeros before t = 0; masked by reach otherwise).
  float win[W - 1][VEC];
#pragma unroll
  for (int j = 1; j < W; ++j) {
    if (t0 - j >= 0) load_input<T, VEC>(p, x + (t0 - j) * p.x_s[2], win[j - 1]);
    else
#pragma unroll
      for (int v = 0; v < VEC; ++v) win[j - 1][v] = 0.f;
  }

  for (int64_t tb = t0; tb < t1; tb += kUnroll) {
    float xs[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (tb + u < t1) load_input<T, VEC>(p, x + (tb + u) * p.x_s[2], xs[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = tb + u;
      if (t >= t1) break;
      const int r = reach[t - tile0];
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float acc = fmaf(w[W - 1][v], xs[u][v], bias[v]);
#pragma unroll
        for (int j = 1; j < W; ++j)
          if (j <= r) acc = fmaf(w[W - 1 - j][v], win[j - 1][v], acc);
        acc = round_to(p.param_dtype, acc);
        out[v] = p.silu ? round_to(p.param_dtype, silu_f(acc)) : acc;
      }
#pragma unroll
      for (int j = W - 2; j > 0; --j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) win[j][v] = win[j - 1][v];
#pragma unroll
      for (int v = 0; v < VEC; ++v) win[0][v] = xs[u][v];
      store_pack<T, VEC>(y + t * p.out_s[2], out);
    }
  }
}

template <typename T, int W, int VEC>
__global__ void __launch_bounds__(kThreads, 3)
    causal_conv1d_backward_kernel(const ConvParams p) {
  constexpr int kTileTokens = kRuns * kBackwardRunTokens;
  constexpr int kTileChannels = kChannelThreads * VEC;
  __shared__ int reach[kTileTokens + W - 1];
  __shared__ float block_sums[kRuns][W + 1][kTileChannels];
  const int64_t b = blockIdx.z;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  fill_reach<W>(p, tile0, kTileTokens + W - 1, reach);

  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kChannelThreads + threadIdx.x) * VEC;
  const int64_t t0 = tile0 + threadIdx.y * kBackwardRunTokens;
  const int64_t t1 = min(t0 + kBackwardRunTokens, p.seq_len);

  float dw[W + 1][VEC];  // taps 0 .. W - 1, then the bias
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw[k][v] = 0.f;

  if (c0 < p.channels && t0 < t1) {
    float w[W][VEC], bias[VEC];
    load_params<W, VEC>(p, c0, w, bias);
    const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_s[0] + c0 * p.x_s[1];
    const T* __restrict__ dy = static_cast<const T*>(p.dy) + b * p.dy_s[0] + c0 * p.dy_s[1];
    T* __restrict__ dx = static_cast<T*>(p.out) + b * p.out_s[0] + c0 * p.out_s[1];

    float xwin[W - 1][VEC];   // xwin[j - 1] = x[t - j]
    float dpwin[W - 1][VEC];  // dpwin[i - 1] = dpre[t - i]
    int rwin[W - 1];          // rwin[i - 1] = reach[t - i]
#pragma unroll
    for (int j = 1; j < W; ++j) {
      rwin[j - 1] = 0;
#pragma unroll
      for (int v = 0; v < VEC; ++v) dpwin[j - 1][v] = 0.f;  // before t0: never used
      if (t0 - j >= 0) load_input<T, VEC>(p, x + (t0 - j) * p.x_s[2], xwin[j - 1]);
      else
#pragma unroll
        for (int v = 0; v < VEC; ++v) xwin[j - 1][v] = 0.f;
    }

    const int64_t t_stop = t1 + W - 1;          // dx of t1 - 1 is emitted at t1 - 1 + W - 1
    const int64_t t_load = min(t_stop, p.seq_len);  // tokens past T have dpre = 0
    for (int64_t tb = t0; tb < t_stop; tb += kUnroll) {
      float xs[kUnroll][VEC], gs[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (tb + u < t_load) {
          load_input<T, VEC>(p, x + (tb + u) * p.x_s[2], xs[u]);
          load_pack<T, VEC>(dy + (tb + u) * p.dy_s[2], gs[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t t = tb + u;
        if (t >= t_stop) break;
        float dp[VEC];
        int r = W - 1;
        if (t < t_load) {
          r = reach[t - tile0];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            float d = round_to(p.param_dtype, gs[u][v]);
            if (p.silu) {
              float acc = fmaf(w[W - 1][v], xs[u][v], bias[v]);
#pragma unroll
              for (int j = 1; j < W; ++j)
                if (j <= r) acc = fmaf(w[W - 1 - j][v], xwin[j - 1][v], acc);
              d = round_to(p.param_dtype, d * silu_grad(round_to(p.param_dtype, acc)));
            }
            dp[v] = d;
          }
          if (t < t1) {  // the weight gradient counts each token of the run once
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              dw[W][v] += dp[v];
              dw[W - 1][v] = fmaf(dp[v], xs[u][v], dw[W - 1][v]);
#pragma unroll
              for (int j = 1; j < W; ++j)
                if (j <= r) dw[W - 1 - j][v] = fmaf(dp[v], xwin[j - 1][v], dw[W - 1 - j][v]);
            }
          }
#pragma unroll
          for (int j = W - 2; j > 0; --j)
#pragma unroll
            for (int v = 0; v < VEC; ++v) xwin[j][v] = xwin[j - 1][v];
#pragma unroll
          for (int v = 0; v < VEC; ++v) xwin[0][v] = xs[u][v];
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) dp[v] = 0.f;
        }
        // dx[t - (W - 1)] = sum_i weight[i] dpre[t - i], where token t - i may see W - 1 - i back.
        const int64_t te = t - (W - 1);
        if (te >= t0) {
          float out[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            float acc = r >= W - 1 ? w[0][v] * dp[v] : 0.f;
#pragma unroll
            for (int i = 1; i < W; ++i)
              if (rwin[i - 1] >= W - 1 - i) acc = fmaf(w[i][v], dpwin[i - 1][v], acc);
            out[v] = round_to(p.param_dtype, acc);
          }
          store_pack<T, VEC>(dx + te * p.out_s[2], out);
        }
#pragma unroll
        for (int i = W - 2; i > 0; --i) {
          rwin[i] = rwin[i - 1];
#pragma unroll
          for (int v = 0; v < VEC; ++v) dpwin[i][v] = dpwin[i - 1][v];
        }
        rwin[0] = r;
#pragma unroll
        for (int v = 0; v < VEC; ++v) dpwin[0][v] = dp[v];
      }
    }
  }

  // Weight and bias gradients: the block's 4 runs in a fixed order, one partial per tile.
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int v = 0; v < VEC; ++v) block_sums[threadIdx.y][k][threadIdx.x * VEC + v] = dw[k][v];
  __syncthreads();
  const int64_t tile_c0 = static_cast<int64_t>(blockIdx.x) * kTileChannels;
  float* partial = p.partials + (b * p.num_tiles + blockIdx.y) * (W + 1) * p.channels;
  for (int i = threadIdx.y * kChannelThreads + threadIdx.x; i < (W + 1) * kTileChannels;
       i += kThreads) {
    const int k = i / kTileChannels, cl = i % kTileChannels;
    if (tile_c0 + cl >= p.channels) continue;
    float s = 0.f;
#pragma unroll
    for (int run = 0; run < kRuns; ++run) s += block_sums[run][k][cl];
    partial[k * p.channels + tile_c0 + cl] = s;
  }
}

// dweight[c, k] (k < W) and dbias[c] (k = W): the partials of all (b, tile) in order.
struct ReduceParams {
  const float* partials;  // [P, W + 1, C]
  int64_t num_partials, channels;
  int width;
  void* dweight;
  void* dbias;  // nullptr: no bias
  DType param_dtype;
  int64_t dweight_s[2], dbias_s;
};

__global__ void __launch_bounds__(256) causal_conv1d_reduce_kernel(const ReduceParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_partial = (p.width + 1) * p.channels;
  if (i >= per_partial) return;
  const int64_t k = i / p.channels, c = i % p.channels;
  float s = 0.f;
  for (int64_t q = 0; q < p.num_partials; ++q) s += p.partials[q * per_partial + i];
  if (k < p.width) {
    store_any(p.dweight, p.param_dtype, c * p.dweight_s[0] + k * p.dweight_s[1], s);
  } else if (p.dbias) {
    store_any(p.dbias, p.param_dtype, c * p.dbias_s, s);
  }
}

struct UpdateParams {
  const void* x;
  void* y;
  void* state;
  const void* weight;
  const void* bias;
  DType param_dtype, state_dtype;
  int64_t x_s[3], y_s[3], state_s[3], weight_s[2], bias_s;
  int64_t batch, channels, new_tokens, state_len;
  bool silu;
  bool pack4;  // the decode case: L = 1, S = 4, state rows of 4 aligned elements of x's dtype
};

template <typename T, int W>
__global__ void __launch_bounds__(256) causal_conv1d_update_kernel(const UpdateParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.channels) return;
  const int64_t b = i / p.channels, c = i % p.channels;  // adjacent threads: adjacent channels
  const int64_t S = p.state_len, L = p.new_tokens;
  const T* x = static_cast<const T*>(p.x) + b * p.x_s[0] + c * p.x_s[1];
  T* y = static_cast<T*>(p.y) + b * p.y_s[0] + c * p.y_s[1];
  const int64_t state_base = b * p.state_s[0] + c * p.state_s[1];
  // Column j of concat(conv_state, x) cast to weight's dtype, as transformers concatenates
  // and casts before both the convolution and the state update.
  auto column = [&](int64_t j) {
    return round_to(p.param_dtype,
                    j < S ? load_any(p.state, p.state_dtype, state_base + j * p.state_s[2])
                          : to_f32(x[(j - S) * p.x_s[2]]));
  };
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k)
    w[k] = load_any(p.weight, p.param_dtype, c * p.weight_s[0] + k * p.weight_s[1]);
  const float bias = p.bias ? load_any(p.bias, p.param_dtype, c * p.bias_s) : 0.f;
  if (p.pack4) {  // one access for the state row in, one out
    T* row = static_cast<T*>(p.state) + state_base;
    const Pack<T, 4> old = *reinterpret_cast<const Pack<T, 4>*>(row);
    float col[5];
#pragma unroll
    for (int j = 0; j < 4; ++j) col[j] = round_to(p.param_dtype, to_f32(old.v[j]));
    col[4] = round_to(p.param_dtype, to_f32(x[0]));
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(w[k], col[5 - W + k], acc);
    acc = round_to(p.param_dtype, acc);
    y[0] = from_f32<T>(p.silu ? round_to(p.param_dtype, silu_f(acc)) : acc);
    Pack<T, 4> next;
#pragma unroll
    for (int j = 0; j < 4; ++j) next.v[j] = from_f32<T>(col[j + 1]);
    *reinterpret_cast<Pack<T, 4>*>(row) = next;
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k)
      acc = fmaf(w[k], column(S - W + 1 + l + k), acc);
    acc = round_to(p.param_dtype, acc);
    y[l * p.y_s[2]] = from_f32<T>(p.silu ? round_to(p.param_dtype, silu_f(acc)) : acc);
  }
  for (int64_t j = 0; j < S; ++j)
    store_any(p.state, p.state_dtype, state_base + j * p.state_s[2], column(L + j));
}

// ----------------------------------------------------------------------------- host side

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

// Packs of `vec` channels need channel stride 1, the other strides multiples of vec elements (a
// dimension of size 1 has no stride that matters), C % vec == 0 and an address aligned to the pack.
bool packable(const TensorRef& t, int vec) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  if (addr % (vec * dtype_size(t.dtype)) != 0 || t.shape[1] % vec != 0) return false;
  if (t.shape[1] > 1 && t.strides[1] != 1) return false;
  for (int d : {0, 2})
    if (t.shape[d] > 1 && t.strides[d] % vec != 0) return false;
  return true;
}

void fill_common(ConvParams& p, const CausalConv1dShape& s, const CausalConv1dInputs& in) {
  p.x = in.x.data;
  p.weight = in.weight.data;
  p.bias = in.bias.defined() ? in.bias.data : nullptr;
  p.param_dtype = in.weight.dtype;
  copy_strides(in.x, p.x_s);
  copy_strides(in.weight, p.weight_s);
  p.bias_s = in.bias.defined() ? in.bias.strides[0] : 0;
  p.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data : nullptr;
  p.cu_seqlens_64 = in.cu_seqlens.defined() && in.cu_seqlens.dtype == DType::kInt64;
  p.cu_seqlens_stride = in.cu_seqlens.defined() ? in.cu_seqlens.strides[0] : 1;
  p.num_offsets = in.cu_seqlens.defined() ? in.cu_seqlens.shape[0] : 0;
  p.channels = s.channels;
  p.seq_len = s.seq_len;
  p.silu = in.silu;
  p.round_x = in.weight.dtype != DType::kFloat32 && in.x.dtype != in.weight.dtype;
}

int64_t num_tiles(int64_t seq_len, int run_tokens) {
  const int64_t tile = static_cast<int64_t>(kRuns) * run_tokens;
  return (seq_len + tile - 1) / tile;
}

void check_grid(const CausalConv1dShape& s, int64_t tiles, const char* op) {
  check_value(tiles <= kMaxGridYZ, op, ": the CUDA kernels take T <= ",
              kMaxGridYZ * static_cast<int64_t>(kRuns) * kForwardRunTokens, " tokens, got T = ",
              s.seq_len);
  check_value(s.batch <= kMaxGridYZ, op, ": the CUDA kernels take B <= ", kMaxGridYZ,
              ", got B = ", s.batch);
}

template <typename T, int W, int VEC>
void launch_forward(const ConvParams& p, int64_t batch, cudaStream_t stream) {
  const dim3 grid((p.channels + kChannelThreads * VEC - 1) / (kChannelThreads * VEC),
                  p.num_tiles, batch);
  causal_conv1d_forward_kernel<T, W, VEC><<<grid, dim3(kChannelThreads, kRuns), 0, stream>>>(p);
}

template <typename T, int W, int VEC>
void launch_backward(const ConvParams& p, int64_t batch, cudaStream_t stream) {
  const dim3 grid((p.channels + kChannelThreads * VEC - 1) / (kChannelThreads * VEC),
                  p.num_tiles, batch);
  causal_conv1d_backward_kernel<T, W, VEC><<<grid, dim3(kChannelThreads, kRuns), 0, stream>>>(p);
}

// Calls Launch<T, W, VEC>(args...) for the runtime dtype, width and pack choice.
template <template <typename, int, int> class Launch, int kPackBytes, typename... Args>
void dispatch(DType dtype, int64_t width, bool pack, Args&&... args) {
  auto by_width = [&](auto type_tag, auto vec_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int VEC = decltype(vec_tag)::value;
    switch (width) {
      case 2: Launch<T, 2, VEC>::run(args...); break;
      case 3: Launch<T, 3, VEC>::run(args...); break;
      default: Launch<T, 4, VEC>::run(args...); break;
    }
  };
  auto by_pack = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int kVec = kPackBytes / sizeof(T);
    if (pack) by_width(type_tag, std::integral_constant<int, kVec>{});
    else by_width(type_tag, std::integral_constant<int, 1>{});
  };
  struct F32 { using type = float; };
  struct F16 { using type = __half; };
  struct BF16 { using type = __nv_bfloat16; };
  switch (dtype) {
    case DType::kFloat32: by_pack(F32{}); break;
    case DType::kFloat16: by_pack(F16{}); break;
    case DType::kBFloat16: by_pack(BF16{}); break;
    default: fail(Error::Kind::kType, "causal_conv1d: unsupported dtype on CUDA");
  }
}

template <typename T, int W, int VEC>
struct Forward {
  static void run(const ConvParams& p, int64_t batch, cudaStream_t stream) {
    launch_forward<T, W, VEC>(p, batch, stream);
  }
};
template <typename T, int W, int VEC>
struct Backward {
  static void run(const ConvParams& p, int64_t batch, cudaStream_t stream) {
    launch_backward<T, W, VEC>(p, batch, stream);
  }
};

int pack_width(DType dtype, int pack_bytes) {
  return pack_bytes / static_cast<int>(dtype_size(dtype));
}

}  // namespace

size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dShape& s) {
  return static_cast<size_t>(s.batch) * num_tiles(s.seq_len, kBackwardRunTokens) *
         (s.width + 1) * s.channels * sizeof(float);
}

void causal_conv1d_forward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                           const CausalConv1dForwardOutputs& out) {
  const char* op = "causal_conv1d";
  ConvParams p{};
  fill_common(p, s, in);
  p.out = out.y.data;
  copy_strides(out.y, p.out_s);
  p.num_tiles = num_tiles(s.seq_len, kForwardRunTokens);
  check_grid(s, p.num_tiles, op);
  if (s.batch == 0 || s.channels == 0 || s.seq_len == 0) return;
  const int vec = pack_width(in.x.dtype, kForwardPackBytes);
  const bool pack = packable(in.x, vec) && packable(out.y, vec);
  const DeviceGuard guard(in.x.device.index);
  dispatch<Forward, kForwardPackBytes>(in.x.dtype, s.width, pack, p, s.batch,
                                       static_cast<cudaStream_t>(in.stream));
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void causal_conv1d_backward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                            const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout) {
  const char* op = "causal_conv1d";
  ConvParams p{};
  fill_common(p, s, in);
  p.dy = gin.dy.data;
  copy_strides(gin.dy, p.dy_s);
  p.out = gout.dx.data;
  copy_strides(gout.dx, p.out_s);
  p.num_tiles = num_tiles(s.seq_len, kBackwardRunTokens);
  p.partials = gout.workspace.defined() ? static_cast<float*>(gout.workspace.data) : nullptr;
  check_grid(s, p.num_tiles, op);
  if (s.channels == 0) return;
  const DeviceGuard guard(in.x.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  if (s.batch > 0 && s.seq_len > 0) {
    const int vec = pack_width(in.x.dtype, kBackwardPackBytes);
    const bool pack =
        packable(in.x, vec) && packable(gin.dy, vec) && packable(gout.dx, vec);
    dispatch<Backward, kBackwardPackBytes>(in.x.dtype, s.width, pack, p, s.batch, stream);
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  }
  ReduceParams r{};
  r.partials = p.partials;
  r.num_partials = s.batch * p.num_tiles;
  r.channels = s.channels;
  r.width = static_cast<int>(s.width);
  r.dweight = gout.dweight.data;
  r.dbias = gout.dbias.defined() ? gout.dbias.data : nullptr;
  r.param_dtype = gout.dweight.dtype;
  copy_strides(gout.dweight, r.dweight_s);
  r.dbias_s = gout.dbias.defined() ? gout.dbias.strides[0] : 0;
  const int64_t n = (s.width + 1) * s.channels;
  causal_conv1d_reduce_kernel<<<(n + 255) / 256, 256, 0, stream>>>(r);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void causal_conv1d_update(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a) {
  UpdateParams p{};
  p.x = a.x.data;
  p.y = a.y.data;
  p.state = a.conv_state.data;
  p.weight = a.weight.data;
  p.bias = a.bias.defined() ? a.bias.data : nullptr;
  p.param_dtype = a.weight.dtype;
  p.state_dtype = a.conv_state.dtype;
  copy_strides(a.x, p.x_s);
  copy_strides(a.y, p.y_s);
  copy_strides(a.conv_state, p.state_s);
  copy_strides(a.weight, p.weight_s);
  p.bias_s = a.bias.defined() ? a.bias.strides[0] : 0;
  p.batch = s.batch;
  p.channels = s.channels;
  p.new_tokens = s.new_tokens;
  p.state_len = s.state_len;
  p.silu = a.silu;
  const TensorRef& st = a.conv_state;
  const int64_t elem = static_cast<int64_t>(dtype_size(st.dtype));
  p.pack4 = s.new_tokens == 1 && s.state_len == 4 && st.dtype == a.x.dtype &&
            st.strides[2] == 1 && (s.channels == 1 || st.strides[1] % 4 == 0) &&
            (s.batch == 1 || st.strides[0] % 4 == 0) &&
            reinterpret_cast<uintptr_t>(st.data) % (4 * elem) == 0;
  const int64_t n = s.batch * s.channels;
  if (n == 0) return;
  const DeviceGuard guard(a.x.device.index);
  const auto stream = static_cast<cudaStream_t>(a.stream);
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  auto launch = [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    switch (s.width) {
      case 2: causal_conv1d_update_kernel<T, 2><<<blocks, 256, 0, stream>>>(p); break;
      case 3: causal_conv1d_update_kernel<T, 3><<<blocks, 256, 0, stream>>>(p); break;
      default: causal_conv1d_update_kernel<T, 4><<<blocks, 256, 0, stream>>>(p); break;
    }
  };
  struct F32 { using type = float; };
  struct F16 { using type = __half; };
  struct BF16 { using type = __nv_bfloat16; };
  switch (a.x.dtype) {
    case DType::kFloat32: launch(F32{}); break;
    case DType::kFloat16: launch(F16{}); break;
    case DType::kBFloat16: launch(BF16{}); break;
    default: fail(Error::Kind::kType, "causal_conv1d_update: unsupported dtype on CUDA");
  }
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
