// rms_norm and rms_norm_gated on the GPU (include/flashdelta/rms_norm.h for the math).
//
// Both directions are memory-bound: the forward reads x (and the gate) and writes y, the
// backward reads x, dy (and the gate) and writes dx (and dgate); everything else is a few
// flops per element. Except the gated backward: two sigmoids with torch's accurate expf and an
// IEEE division per element made it issue-bound (~85 instructions an element, 96 us of issue at
// 8192 x 32 heads x 128 on an H100 against 107 us of traffic); the backward needs no bit
// equality with torch, so it computes the sigmoid once with the fast exponential and reciprocal.
//
// Layout: a row of D elements is D / N vectors (16-byte packs, N = 8 in bf16; N = 1 when D, a
// stride or a pointer is not aligned), read by a group of `width` threads (a power of two up to
// the 256-thread block); thread t of the group owns vectors t, t + width, ... A block holds
// 256 / width rows at once: 1 of the hidden norm (D = 2048 bf16), 8 and 16 of the per-head norms
// (D = 256, 128). Row sums (sum x^2, sum(dn n)): butterfly shuffles within the group, then, for
// groups wider than a warp, the warps' sums added in order through shared memory; every thread
// of the row gets bitwise the same total.
//
// Streaming path (16-byte vectors, D / N <= 256: every Qwen3.5 norm in bf16): one vector per
// thread, persistent blocks (as many as fit on the device; at most 2 an SM in the backward, see
// kStages) walking rows. The rows stream through a per-thread ring of cp.async copies in shared
// memory, kStages rows ahead: a thread copies and later reads only its own slots, so the ring
// needs no barrier, and the bytes in flight (2 to 4 rows a thread) cost no registers. The first
// version loaded rows into registers, one row in flight per warp; with more rows per thread in
// registers the occupancy fell instead (rms_norm backward at D = 2048 went from 84 us to 51 us
// with one row prefetched, and back to 88 us with four vectors a thread). The thread's weights
// and weight-gradient sums stay in registers.
// General path (anything else): rows re-read by the second pass (from L1 / L2), the weight read
// per use, the backward's weight-gradient sums in shared memory per row group.
//
// Backward, per row: pass 1 computes dn (the gradient reaching n = x r), sum(dn n), the gate
// gradient and the weight-gradient terms; pass 2 writes dx = r (dn - n mean(dn n)). At the end a
// block adds its row groups' weight gradients in order into workspace[block, :], and
// column_sums.cuh adds the blocks per column in a fixed order: deterministic for a given device
// (the persistent grid is sized from the device's multiprocessor count), no float atomics.
// Assumes: backward D <= 12288 (shared memory of the general path).
#include <algorithm>

#include "core/check.h"
#include "core/fused_ops_backend.h"
#include "cuda/column_sums.cuh"
#include "cuda/cp_async.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/pdl.cuh"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / 32;
constexpr int64_t kMaxBackwardBlocks = 2048;  // bounds the workspace: [blocks, D] fp32 partials
constexpr int64_t kMaxGeneralDim = 12288;     // 48 KiB of fp32 weight-gradient sums a block

struct RmsNormParams {
  const void* x;
  const void* gate;    // nullptr: not gated
  const void* weight;
  void* y;             // forward: y; backward: dx
  void* dgate;         // backward, gated
  const void* dy;      // backward
  float* rstd;
  float* partials;     // backward: [gridDim.x, dim]
  int64_t x_stride, gate_stride, y_stride, dy_stride, dgate_stride;
  int64_t rows, dim;
  int width;           // threads per row: a power of two <= kBlockThreads
  DType weight_dtype;
  bool round_product;  // weight has x's dtype: weight * n is rounded to it (torch promotion)
  float eps;
};

// Threads per row for a row of `vecs` vectors: the next power of two, at most a block.
int row_width(int64_t vecs) {
  int width = 1;
  while (width < vecs && width < kBlockThreads) width <<= 1;
  return width;
}

// The sum of v over the `width` threads of each row group, in every thread of the group. Called
// by every thread of the block, with `parity` alternating between calls: groups wider than a
// warp add their warps' sums through shared memory, double-buffered so that one barrier a call
// suffices (a buffer is written again two calls later, after the next call's barrier, which every
// thread reaches only once done reading it).
struct WarpSums {
  alignas(16) float sums[2][kBlockWarps];
};
__device__ __forceinline__ float group_sum(float v, int width, WarpSums& shared, int parity) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < width) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  if (width <= 32) return v;
  const int warp = threadIdx.x >> 5;
  float* sums = shared.sums[parity];
  if ((threadIdx.x & 31) == 0) sums[warp] = v;
  __syncthreads();
  const int warps = width >> 5, first = warp & ~(warps - 1);
  float total = 0.f;
  if (warps == kBlockWarps) {  // a row per block (the hidden norm): two 16-byte reads, not eight
    static_assert(kBlockWarps == 8, "two float4 reads");
    const float4 lo = reinterpret_cast<const float4*>(sums)[0];
    const float4 hi = reinterpret_cast<const float4*>(sums)[1];
    return ((((((lo.x + lo.y) + lo.z) + lo.w) + hi.x) + hi.y) + hi.z) + hi.w;
  }
  for (int w = 0; w < warps; ++w) total += sums[first + w];
  return total;
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& pack, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(pack.v[i]);
}

// One vector of y (torch's rounding steps: bf16 / fp16 outputs equal transformers').
template <typename T, int N, bool kGated>
__device__ __forceinline__ void normalize(const RmsNormParams& p, const float (&w)[N], float r,
                                          const float (&a)[N], const float (&z)[N],
                                          float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (kGated) {
      float prod = mul_rn(w[i], round_to<T>(mul_rn(a[i], r)));
      if (p.round_product) prod = round_to<T>(prod);
      out[i] = mul_rn(prod, silu(z[i]));
    } else {
      out[i] = mul_rn(mul_rn(a[i], r), 1.0f + w[i]);
    }
  }
}

// The backward's sigmoid: fast exponential and correctly rounded reciprocal (no bit equality
// with torch is needed for gradients; 1 + e^-z = inf gives 0).
__device__ __forceinline__ float fast_sigmoid(float z) { return __frcp_rn(1.0f + __expf(-z)); }

// One vector of the backward, pass 1: accumulates the weight-gradient terms into dw, returns
// the vector's part of sum(dn n) and writes the gate gradient into dz.
template <typename T, int N, bool kGated>
__device__ __forceinline__ float backward_terms(const RmsNormParams& p, const float (&w)[N],
                                                float r, const float (&a)[N], const float (&g)[N],
                                                const float (&sig)[N], const float (&z)[N],
                                                float (&dw)[N], float (&dz)[N]) {
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float n = mul_rn(a[i], r);
    if constexpr (kGated) {
      const float n_rounded = round_to<T>(n);
      float prod = mul_rn(w[i], n_rounded);
      if (p.round_product) prod = round_to<T>(prod);
      const float dp = g[i] * (z[i] * sig[i]);
      dz[i] = g[i] * prod * (sig[i] * (1.0f + z[i] * (1.0f - sig[i])));
      dw[i] += dp * n_rounded;
      dot += (dp * w[i]) * n;
    } else {
      dw[i] += g[i] * n;
      dot += g[i] * (1.0f + w[i]) * n;
    }
  }
  return dot;
}

// One vector of dx (pass 2).
template <int N, bool kGated>
__device__ __forceinline__ void input_gradient(const float (&w)[N], float r, float mean_dot,
                                               const float (&a)[N], const float (&g)[N],
                                               const float (&sig)[N], const float (&z)[N],
                                               float (&dx)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float dn = kGated ? g[i] * (z[i] * sig[i]) * w[i] : g[i] * (1.0f + w[i]);
    dx[i] = r * (dn - mul_rn(a[i], r) * mean_dot);
  }
}

template <int N>
__device__ __forceinline__ void load_weights(const RmsNormParams& p, int64_t v, float (&w)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) w[i] = load_float(p.weight, p.weight_dtype, v * N + i);
}

// ---------------------------------------------------------------------------------------------
// Streaming path: one vector per thread, rows through a per-thread cp.async ring.

// The ring in dynamic shared memory: per stage, one slot per thread of x, dy (backward), the
// gate (gated) and rstd (backward).
template <typename T, int N, bool kGated, bool kBackward, int kStages>
struct Ring {
  using V = Pack<T, N>;
  static constexpr int kTensors = 1 + (kBackward ? 1 : 0) + (kGated ? 1 : 0);
  static constexpr size_t kBytes =
      size_t{kStages} * kBlockThreads * (kTensors * sizeof(V) + (kBackward ? sizeof(float) : 0));
  V* x;
  V* dy;
  V* z;
  float* rstd;

  __device__ __forceinline__ explicit Ring(unsigned char* smem) {
    V* base = reinterpret_cast<V*>(smem);
    x = base;
    dy = x + kStages * kBlockThreads;
    z = dy + (kBackward ? kStages * kBlockThreads : 0);
    rstd = reinterpret_cast<float*>(z + (kGated ? kStages * kBlockThreads : 0));
  }

  // This thread's pack of `slot` in one 16-byte shared-memory load. (Unpacked through a reference
  // into the ring, the packs were read element by element: eight LDS.U16 a vector, whose
  // latencies the row sums then waited on.)
  __device__ __forceinline__ static V load(const V* ring, int slot) {
    static_assert(sizeof(V) == 16, "the ring holds 16-byte vectors");
    const uint4 bits = reinterpret_cast<const uint4*>(ring)[slot];
    V v;
    memcpy(&v, &bits, sizeof(V));
    return v;
  }

  // Copies row `row`'s vector t of every tensor into this thread's slot of stage `stage` (nothing
  // for rows past the end or threads without a vector), then commits one group either way.
  __device__ __forceinline__ void fetch(const RmsNormParams& p, int64_t row, int stage, int64_t t,
                                        bool has_vec) {
    const int slot = stage * kBlockThreads + threadIdx.x;
    if (has_vec && row < p.rows) {
      cp_async_16(x + slot, static_cast<const T*>(p.x) + row * p.x_stride + t * N);
      if constexpr (kBackward) {
        cp_async_16(dy + slot, static_cast<const T*>(p.dy) + row * p.dy_stride + t * N);
        cp_async_4(rstd + slot, p.rstd + row);
      }
      if constexpr (kGated) {
        cp_async_16(z + slot, static_cast<const T*>(p.gate) + row * p.gate_stride + t * N);
      }
    }
    cp_async_commit();
  }
};

// Rows in flight: kStages a thread (the next rows are issued while the current one is computed)
// and, in the backward, at most kStreamBackwardBlocksPerSm blocks an SM. Fewer rows in flight
// measured faster, not slower (H100, bf16, 8192 rows, fwd + bwd as a graph replayed after an L2
// eviction by reading, session 11): the hidden norm (D = 2048) took 79.0 us with 6 forward and 4
// backward stages and 4 backward blocks an SM (all that fit), 76.6 with 2 forward stages, 76.3
// with 2 blocks, 73.4 with both, 72.8 with 3 backward stages as well; 1 block an SM gave 75.3.
// The per-head norms moved by under 2% (q_norm 130.8 -> 128.8 us, rms_norm_gated within 0.5%).
// Session 6 had seen the same upwards (5 backward blocks an SM 53.2 us, 6 with 3 stages 61.1,
// against 48.7). Why is not measured yet: the rows in flight across the GPU (2 blocks x 132 SMs x
// 3 stages x 8 KB = 6 MB at D = 2048) still far exceed what the DRAM latency needs.
template <bool kGated, bool kBackward>
constexpr int kStages = kBackward ? 3 : (kGated ? 4 : 2);
constexpr int kStreamBackwardBlocksPerSm = 2;

template <typename T, int N, bool kGated>
__global__ void __launch_bounds__(kBlockThreads)
    rms_norm_forward_stream_kernel(const RmsNormParams p) {
  constexpr int S = kStages<kGated, false>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ WarpSums warp_sums;
  int parity = 0;
  Ring<T, N, kGated, false, S> ring(smem);
  const int width = p.width, t = threadIdx.x & (width - 1), group = threadIdx.x / width;
  const int64_t groups = kBlockThreads / width, step = static_cast<int64_t>(gridDim.x) * groups;
  const bool has_vec = t < p.dim / N;  // width is vecs rounded up to a power of two
  float w[N] = {};
  if (has_vec) load_weights<N>(p, t, w);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * groups + group;
  for (int s = 0; s < S; ++s) ring.fetch(p, first_row + s * step, s, t, has_vec);
  // Block-uniform loop (group_sum may synchronise): rows past the end take part with zeros.
  int stage = 0;
  for (int64_t row = first_row; row - group < p.rows; row += step) {
    cp_async_wait<S - 1>();  // this row's copies (the oldest group) have landed
    const int slot = stage * kBlockThreads + threadIdx.x;
    const bool valid = has_vec && row < p.rows;
    float a[N] = {}, z[N] = {};
    if (valid) {
      unpack(ring.load(ring.x, slot), a);
      if constexpr (kGated) unpack(ring.load(ring.z, slot), z);
    }
    float sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) sum_sq += a[i] * a[i];
    sum_sq = group_sum(sum_sq, width, warp_sums, parity);
    parity ^= 1;
    if (valid) {
      const float r = rsqrtf(sum_sq / static_cast<float>(p.dim) + p.eps);
      if (t == 0) p.rstd[row] = r;
      float out[N];
      normalize<T, N, kGated>(p, w, r, a, z, out);
      store_pack<T, N>(static_cast<T*>(p.y) + row * p.y_stride + t * N, out);
    }
    // Refill the slot just read (its values are consumed above) with the row S steps ahead.
    ring.fetch(p, row + S * step, stage, t, has_vec);
    stage = stage + 1 == S ? 0 : stage + 1;
  }
  cp_async_wait<0>();
}

template <typename T, int N, bool kGated>
__global__ void __launch_bounds__(kBlockThreads)
    rms_norm_backward_stream_kernel(const RmsNormParams p) {
  constexpr int S = kStages<kGated, true>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ WarpSums warp_sums;
  int parity = 0;
  Ring<T, N, kGated, true, S> ring(smem);
  const int width = p.width, t = threadIdx.x & (width - 1), group = threadIdx.x / width;
  const int64_t groups = kBlockThreads / width, step = static_cast<int64_t>(gridDim.x) * groups;
  const bool has_vec = t < p.dim / N;
  float w[N] = {}, dw[N] = {};
  if (has_vec) load_weights<N>(p, t, w);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * groups + group;
  for (int s = 0; s < S; ++s) ring.fetch(p, first_row + s * step, s, t, has_vec);
  int stage = 0;
  for (int64_t row = first_row; row - group < p.rows; row += step) {
    cp_async_wait<S - 1>();
    const int slot = stage * kBlockThreads + threadIdx.x;
    const bool valid = has_vec && row < p.rows;
    float a[N] = {}, g[N] = {}, z[N] = {}, sig[N] = {}, dz[N];
    float r = 0.f;
    if (valid) {
      unpack(ring.load(ring.x, slot), a);
      unpack(ring.load(ring.dy, slot), g);
      r = ring.rstd[slot];
      if constexpr (kGated) {
        unpack(ring.load(ring.z, slot), z);
#pragma unroll
        for (int i = 0; i < N; ++i) sig[i] = fast_sigmoid(z[i]);
      }
    }
    const float dot = backward_terms<T, N, kGated>(p, w, r, a, g, sig, z, dw, dz);
    const float mean_dot = group_sum(dot, width, warp_sums, parity) / static_cast<float>(p.dim);
    parity ^= 1;
    if (valid) {
      if constexpr (kGated) {
        store_pack<T, N>(static_cast<T*>(p.dgate) + row * p.dgate_stride + t * N, dz);
      }
      float dx[N];
      input_gradient<N, kGated>(w, r, mean_dot, a, g, sig, z, dx);
      store_pack<T, N>(static_cast<T*>(p.y) + row * p.y_stride + t * N, dx);
    }
    ring.fetch(p, row + S * step, stage, t, has_vec);
    stage = stage + 1 == S ? 0 : stage + 1;
  }
  cp_async_wait<0>();
  allow_dependents();  // the column sums' blocks may take the SMs (they wait for the partials)

  // The block's weight gradient: its row groups' sums added in group order (rows past the end
  // added zeros), through the ring's shared memory (groups * D <= 256 N floats: width >= D / N).
  float* partial = p.partials + static_cast<int64_t>(blockIdx.x) * p.dim;
  if (groups == 1) {
    if (has_vec) {
#pragma unroll
      for (int i = 0; i < N; ++i) partial[t * N + i] = dw[i];
    }
    return;
  }
  float* sums = reinterpret_cast<float*>(smem);
  __syncthreads();  // every thread is past its last read of the ring
  if (has_vec) {
#pragma unroll
    for (int i = 0; i < N; ++i) sums[group * p.dim + t * N + i] = dw[i];
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.dim; j += kBlockThreads) {
    float total = 0.f;
    for (int gi = 0; gi < groups; ++gi) total += sums[gi * p.dim + j];
    partial[j] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// General path: any D, 16-byte vectors or single elements; rows re-read by the second pass.

template <typename T, int N>
__device__ __forceinline__ void load_vector(const T* row, int64_t v, float (&out)[N]) {
  unpack(*reinterpret_cast<const Pack<T, N>*>(row + v * N), out);
}

template <typename T, int N, bool kGated>
__global__ void __launch_bounds__(kBlockThreads)
    rms_norm_forward_kernel(const RmsNormParams p) {
  __shared__ WarpSums warp_sums;
  int parity = 0;
  const int width = p.width, t = threadIdx.x & (width - 1);
  const int64_t groups = kBlockThreads / width, vecs = p.dim / N;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < p.rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + threadIdx.x / width;
    const bool valid = row < p.rows;
    const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_stride;
    float sum_sq = 0.f;
    for (int64_t v = t; valid && v < vecs; v += width) {
      float a[N];
      load_vector<T, N>(x, v, a);
#pragma unroll
      for (int i = 0; i < N; ++i) sum_sq += a[i] * a[i];
    }
    sum_sq = group_sum(sum_sq, width, warp_sums, parity);
    parity ^= 1;
    if (!valid) continue;
    const float r = rsqrtf(sum_sq / static_cast<float>(p.dim) + p.eps);
    if (t == 0) p.rstd[row] = r;
    const T* gate = kGated ? static_cast<const T*>(p.gate) + row * p.gate_stride : nullptr;
    T* y = static_cast<T*>(p.y) + row * p.y_stride;
    for (int64_t v = t; v < vecs; v += width) {
      float a[N], z[N] = {}, w[N], out[N];
      load_vector<T, N>(x, v, a);
      if constexpr (kGated) load_vector<T, N>(gate, v, z);
      load_weights<N>(p, v, w);
      normalize<T, N, kGated>(p, w, r, a, z, out);
      store_pack<T, N>(y + v * N, out);
    }
  }
}

// Dynamic shared memory: [groups, D] fp32 weight-gradient sums, element i of vector v of row
// group g at g D + i vecs + v (a thread owns its vectors' slots; the threads of one access touch
// consecutive words).
template <typename T, int N, bool kGated>
__global__ void __launch_bounds__(kBlockThreads)
    rms_norm_backward_kernel(const RmsNormParams p) {
  extern __shared__ float dw_sums[];
  __shared__ WarpSums warp_sums;
  int parity = 0;
  const int width = p.width, t = threadIdx.x & (width - 1), group = threadIdx.x / width;
  const int64_t groups = kBlockThreads / width, vecs = p.dim / N;
  float* dw_row = dw_sums + group * p.dim;
  for (int64_t v = t; v < vecs; v += width) {
#pragma unroll
    for (int i = 0; i < N; ++i) dw_row[i * vecs + v] = 0.f;
  }
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < p.rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + group;
    const bool valid = row < p.rows;
    const int64_t r0 = valid ? row : 0;
    const T* x = static_cast<const T*>(p.x) + r0 * p.x_stride;
    const T* dy = static_cast<const T*>(p.dy) + r0 * p.dy_stride;
    const T* gate = kGated ? static_cast<const T*>(p.gate) + r0 * p.gate_stride : nullptr;
    const float r = valid ? p.rstd[row] : 0.f;
    auto load = [&](int64_t v, float (&a)[N], float (&g)[N], float (&z)[N], float (&sig)[N],
                    float (&w)[N]) {
      load_vector<T, N>(x, v, a);
      load_vector<T, N>(dy, v, g);
      if constexpr (kGated) {
        load_vector<T, N>(gate, v, z);
#pragma unroll
        for (int i = 0; i < N; ++i) sig[i] = fast_sigmoid(z[i]);
      }
      load_weights<N>(p, v, w);
    };
    float dot = 0.f;
    for (int64_t v = t; valid && v < vecs; v += width) {
      float a[N], g[N], z[N] = {}, sig[N] = {}, w[N], dz[N], dw[N];
      load(v, a, g, z, sig, w);
#pragma unroll
      for (int i = 0; i < N; ++i) dw[i] = dw_row[i * vecs + v];
      dot += backward_terms<T, N, kGated>(p, w, r, a, g, sig, z, dw, dz);
#pragma unroll
      for (int i = 0; i < N; ++i) dw_row[i * vecs + v] = dw[i];
      if constexpr (kGated) {
        store_pack<T, N>(static_cast<T*>(p.dgate) + row * p.dgate_stride + v * N, dz);
      }
    }
    const float mean_dot = group_sum(dot, width, warp_sums, parity) / static_cast<float>(p.dim);
    parity ^= 1;
    if (!valid) continue;
    T* dx_row = static_cast<T*>(p.y) + row * p.y_stride;
    for (int64_t v = t; v < vecs; v += width) {
      float a[N], g[N], z[N] = {}, sig[N] = {}, w[N], dx[N];
      load(v, a, g, z, sig, w);
      input_gradient<N, kGated>(w, r, mean_dot, a, g, sig, z, dx);
      store_pack<T, N>(dx_row + v * N, dx);
    }
  }
  __syncthreads();
  float* partial = p.partials + static_cast<int64_t>(blockIdx.x) * p.dim;
  for (int64_t j = threadIdx.x; j < p.dim; j += kBlockThreads) {
    const int64_t slot = (j % N) * vecs + j / N;
    float total = 0.f;
    for (int gi = 0; gi < groups; ++gi) total += dw_sums[gi * p.dim + slot];
    partial[j] = total;
  }
}

// dweight[j] = sum over the backward's blocks of partials[b, j] (column_sums.cuh).
struct StoreWeightGradient {
  void* dweight;
  DType dtype;
  __device__ void operator()(int64_t j, float sum) const { store_float(dweight, dtype, j, sum); }
};

// ---------------------------------------------------------------------------------------------
// Host side.

RmsNormParams make_params(const RmsNormInputs& in, const RowsShape& s) {
  RmsNormParams p{};
  p.x = in.x.data;
  p.gate = in.gate.defined() ? in.gate.data : nullptr;
  p.weight = in.weight.data;
  p.x_stride = in.x.stride(0);
  p.gate_stride = in.gate.defined() ? in.gate.stride(0) : 0;
  p.rows = s.rows;
  p.dim = s.dim;
  p.weight_dtype = in.weight.dtype;
  p.round_product = in.weight.dtype == in.x.dtype;
  p.eps = static_cast<float>(in.eps);
  return p;
}

// Blocks of `kernel` that fit on the device at once (the persistent grid).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, size_t smem, int device) {
  return cuda::resident_blocks(reinterpret_cast<const void*>(kernel), kBlockThreads, smem, device);
}

// The launch: which path, the row-group width and the grid (rows / groups, capped at `cap`
// blocks). The streaming path needs 16-byte vectors and at most one vector per thread.
struct Launch {
  bool stream;
  int width;
  unsigned blocks;
  size_t smem;
};

template <typename T, bool kGated, bool kBackward>
Launch plan(const RowsShape& s, bool vector, int device) {
  constexpr int n = kVec<T>;
  const int64_t vecs = vector ? s.dim / n : s.dim;
  Launch l{};
  l.stream = vector && vecs <= kBlockThreads;
  l.width = row_width(vecs);
  const int64_t groups = kBlockThreads / l.width;
  const int64_t needed = (s.rows + groups - 1) / groups;
  int64_t cap = int64_t{1} << 30;
  if (l.stream) {
    l.smem = Ring<T, n, kGated, kBackward, kStages<kGated, kBackward>>::kBytes;
    cap = kBackward ? resident_blocks(rms_norm_backward_stream_kernel<T, n, kGated>, l.smem, device)
                    : resident_blocks(rms_norm_forward_stream_kernel<T, n, kGated>, l.smem, device);
  } else if (kBackward) {
    l.smem = static_cast<size_t>(groups * s.dim) * sizeof(float);
    cap = vector ? resident_blocks(rms_norm_backward_kernel<T, n, kGated>, l.smem, device)
                 : resident_blocks(rms_norm_backward_kernel<T, 1, kGated>, l.smem, device);
  }
  if (l.stream && kBackward) {
    cap = std::min<int64_t>(cap, int64_t{kStreamBackwardBlocksPerSm} *
                                     device_info(device).sm_count);
  }
  if (kBackward) cap = std::min(cap, kMaxBackwardBlocks);
  cap = std::max<int64_t>(cap, 1);
  // As many row groups a block as the cap needs, split evenly: the grid ends with every block
  // done at once (the backward's 8192 rows on 264 blocks would be 31 or 32 a block; 256 blocks
  // take 32 each).
  const int64_t per_block = (needed + cap - 1) / cap;
  l.blocks = static_cast<unsigned>((needed + per_block - 1) / per_block);
  return l;
}

template <typename T, bool kGated>
void launch_forward(RmsNormParams p, const Launch& l, bool vector, cudaStream_t stream) {
  constexpr int n = kVec<T>;
  p.width = l.width;
  if (l.stream) {
    rms_norm_forward_stream_kernel<T, n, kGated><<<l.blocks, kBlockThreads, l.smem, stream>>>(p);
  } else if (vector) {
    rms_norm_forward_kernel<T, n, kGated><<<l.blocks, kBlockThreads, 0, stream>>>(p);
  } else {
    rms_norm_forward_kernel<T, 1, kGated><<<l.blocks, kBlockThreads, 0, stream>>>(p);
  }
}

template <typename T, bool kGated>
void launch_backward(RmsNormParams p, const Launch& l, bool vector, cudaStream_t stream) {
  constexpr int n = kVec<T>;
  p.width = l.width;
  if (l.stream) {
    rms_norm_backward_stream_kernel<T, n, kGated><<<l.blocks, kBlockThreads, l.smem, stream>>>(p);
  } else if (vector) {
    rms_norm_backward_kernel<T, n, kGated><<<l.blocks, kBlockThreads, l.smem, stream>>>(p);
  } else {
    rms_norm_backward_kernel<T, 1, kGated><<<l.blocks, kBlockThreads, l.smem, stream>>>(p);
  }
}

}  // namespace

void rms_norm_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out,
                      const RowsShape& s) {
  if (s.rows == 0) return;
  DeviceGuard guard(in.x.device.index);
  RmsNormParams p = make_params(in, s);
  p.y = out.y.data;
  p.y_stride = out.y.stride(0);
  p.rstd = static_cast<float*>(out.rstd.data);
  const bool gated = in.gate.defined();
  const auto stream = static_cast<cudaStream_t>(in.stream);
  dispatch_float(in.x.dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int n = kVec<T>;
    const bool vector = s.dim % n == 0 && vector_aligned(in.x, n) && vector_aligned(out.y, n) &&
                        (!gated || vector_aligned(in.gate, n));
    if (gated) launch_forward<T, true>(p, plan<T, true, false>(s, vector, in.x.device.index), vector, stream);
    else launch_forward<T, false>(p, plan<T, false, false>(s, vector, in.x.device.index), vector, stream);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

// An upper bound of the grids plan() chooses (at most one block per row, kMaxBackwardBlocks):
// the workspace size may depend on the shape only.
size_t rms_norm_backward_workspace_bytes(const RowsShape& s) {
  return static_cast<size_t>(std::min(s.rows, kMaxBackwardBlocks) * s.dim) * sizeof(float);
}

void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& a, const RowsShape& s) {
  check_value(s.dim <= kMaxGeneralDim, "rms_norm_backward: the CUDA kernel handles D <= ",
              kMaxGeneralDim, ", got D = ", s.dim);
  DeviceGuard guard(in.x.device.index);
  RmsNormParams p = make_params(in, s);
  p.y = a.dx.data;
  p.y_stride = a.dx.stride(0);
  p.dy = a.dy.data;
  p.dy_stride = a.dy.stride(0);
  p.dgate = a.dgate.defined() ? a.dgate.data : nullptr;
  p.dgate_stride = a.dgate.defined() ? a.dgate.stride(0) : 0;
  p.rstd = static_cast<float*>(a.rstd.data);
  p.partials = static_cast<float*>(a.workspace.data);
  const bool gated = in.gate.defined();
  const auto stream = static_cast<cudaStream_t>(in.stream);
  unsigned blocks = 0;
  if (s.rows > 0) {
    dispatch_float(in.x.dtype, [&](auto t) {
      using T = decltype(t);
      constexpr int n = kVec<T>;
      const bool vector = s.dim % n == 0 && vector_aligned(in.x, n) && vector_aligned(a.dy, n) &&
                          vector_aligned(a.dx, n) &&
                          (!gated || (vector_aligned(in.gate, n) && vector_aligned(a.dgate, n)));
      const int dev = in.x.device.index;
      const Launch l = gated ? plan<T, true, true>(s, vector, dev) : plan<T, false, true>(s, vector, dev);
      blocks = l.blocks;
      if (gated) launch_backward<T, true>(p, l, vector, stream);
      else launch_backward<T, false>(p, l, vector, stream);
    });
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  }
  launch_column_sums(p.partials, blocks, s.dim,
                     StoreWeightGradient{a.dweight.data, a.dweight.dtype}, stream);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
