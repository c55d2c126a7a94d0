// rms_norm and rms_norm_gated on the GPU (include/flashdelta/rms_norm.h for the math).
//
// Forward: one warp per row, 4 rows per 128-thread block. A lane reads 16-byte vectors
// v = lane, lane + 32, ... of the row; pass 1 sums x^2 (fp32, butterfly shuffles: every lane gets
// the same total), pass 2 writes y from the same vectors, kept in registers for rows of up to
// 256 vectors (D <= 2048 in bf16; longer rows are re-read from L1/L2). rstd[row] is kept for the
// backward. One read of x (and gate), one write of y.
// Backward: same warp-per-row walk, rows grid-strided over a grid that depends on the shape only
// (256 to 2048 blocks, fewer for long rows; independent of the device, so the workspace size is
// a function of the shape; see backward_blocks):
//   pass 1: dn (the gradient reaching n = x r), sum(dn n), the gate gradient, and the weight
//           gradient accumulated in the warp's own fp32 row of shared memory (a lane always owns
//           the same columns, so no atomics; laid out so that a warp's access has no bank
//           conflicts, see dweight_slot);
//   pass 2: dx = r (dn - n mean(dn n)), from the row vectors pass 1 kept in registers.
// At the end the block adds its warps' rows in order into workspace[block, :], and a second
// kernel adds the blocks per column in a fixed order (32 columns x 32 row groups a block):
// deterministic, no float atomics.
// Vector path when D and every row stride are multiples of the vector width and the pointers are
// 16-byte aligned; otherwise the same kernels with one element per access.
// Assumes: backward D <= 12040 (shared memory for the per-warp weight-gradient rows).
#include <algorithm>

#include "core/check.h"
#include "core/fused_ops_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kForwardWarps = 4;
constexpr int64_t kMinBackwardBlocks = 256, kMaxBackwardBlocks = 2048;
constexpr int64_t kBackwardPartialFloats = int64_t{1} << 20;  // partials budget, see backward_blocks
constexpr size_t kMaxStaticSmem = 48 * 1024;

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
  DType weight_dtype;
  bool round_product;  // weight has x's dtype: weight * n is rounded to it (torch promotion)
  float eps;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Visits the lane's vectors of a row, v = lane + 32 k, as f(k, v). With kCache > 0 the row has at
// most 32 * kCache vectors and the loop is unrolled, so per-k register arrays stay in registers
// (the first pass keeps what it loaded, the second reuses it: one read of the row in all). With
// kCache == 0 (long rows) the second pass reads the row again, from L1 / L2.
template <int kCache, typename F>
__device__ __forceinline__ void for_lane_vectors(int lane, int64_t vecs, F&& f) {
  if constexpr (kCache > 0) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t v = lane + 32 * k;
      if (v < vecs) f(k, v);
    }
  } else {
    for (int64_t v = lane; v < vecs; v += 32) f(0, v);
  }
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// The vector pass 1 kept (kCache > 0), or a fresh load of it.
template <int kCache, typename T, int N, int kSlots>
__device__ __forceinline__ Pack<T, N> reuse(const Pack<T, N> (&cache)[kSlots], int k, const T* p) {
  if constexpr (kCache > 0) {
    return cache[k];
  } else {
    return load_raw<T, N>(p);
  }
}

template <typename T, int N>
__device__ __forceinline__ void unpack(const Pack<T, N>& pack, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(pack.v[i]);
}

// One row's vector: the value that leaves the forward.
template <typename T, int N, bool kGated>
__device__ __forceinline__ void normalize(const RmsNormParams& p, int64_t v, float r,
                                          const float (&a)[N], const float (&z)[N],
                                          float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float w = load_float(p.weight, p.weight_dtype, v * N + i);
    if constexpr (kGated) {
      float prod = mul_rn(w, round_to<T>(mul_rn(a[i], r)));
      if (p.round_product) prod = round_to<T>(prod);
      out[i] = mul_rn(prod, silu(z[i]));
    } else {
      out[i] = mul_rn(mul_rn(a[i], r), 1.0f + w);
    }
  }
}

template <typename T, int N, bool kGated, int kCache>
__global__ void __launch_bounds__(kForwardWarps * 32)
    rms_norm_forward_kernel(const RmsNormParams p) {
  constexpr int kSlots = kCache > 0 ? kCache : 1;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kForwardWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;  // whole warps: the shuffles below never see an absent lane
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* gate = kGated ? static_cast<const T*>(p.gate) + row * p.gate_stride : nullptr;
  const int64_t vecs = p.dim / N;
  Pack<T, N> x_cache[kSlots];
  float sum_sq = 0.f;
  for_lane_vectors<kCache>(lane, vecs, [&](int k, int64_t v) {
    const Pack<T, N> pack = load_raw<T, N>(x + v * N);
    if constexpr (kCache > 0) x_cache[k] = pack;
    float a[N];
    unpack(pack, a);
#pragma unroll
    for (int i = 0; i < N; ++i) sum_sq += a[i] * a[i];
  });
  sum_sq = warp_sum(sum_sq);
  const float r = rsqrtf(sum_sq / static_cast<float>(p.dim) + p.eps);
  if (lane == 0) p.rstd[row] = r;

  T* y = static_cast<T*>(p.y) + row * p.y_stride;
  for_lane_vectors<kCache>(lane, vecs, [&](int k, int64_t v) {
    float a[N], z[N], out[N];
    unpack(reuse<kCache>(x_cache, k, x + v * N), a);
    if constexpr (kGated) load_pack<T, N>(gate + v * N, z);
    normalize<T, N, kGated>(p, v, r, a, z, out);
    store_pack<T, N>(y + v * N, out);
  });
}

// The backward's per-warp weight-gradient row in shared memory. Element i of vector v (column
// v N + i, owned by lane v % 32) lives at ((v / 32) N + i) 32 + v % 32: the 32 lanes of one
// access touch 32 consecutive words, so the read-modify-writes are free of bank conflicts. The
// row is padded to whole groups of 32 vectors.
__host__ __device__ __forceinline__ int64_t dweight_slot(int64_t v, int i, int n) {
  return ((v >> 5) * n + i) * 32 + (v & 31);
}
__host__ __device__ __forceinline__ int64_t dweight_row_floats(int64_t dim, int n) {
  return (dim / n + 31) / 32 * 32 * n;
}

template <typename T, int N, bool kGated, int kCache>
__global__ void rms_norm_backward_kernel(const RmsNormParams p) {
  constexpr int kSlots = kCache > 0 ? kCache : 1;
  extern __shared__ float dweight_rows[];  // [warps, row_floats]: see dweight_slot
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t vecs = p.dim / N;
  const int64_t row_floats = dweight_row_floats(p.dim, N);
  float* dw = dweight_rows + static_cast<int64_t>(warp) * row_floats;
  // Slot s belongs to lane s % 32 (dweight_slot): each lane clears the slots it will add to.
  for (int64_t s = lane; s < row_floats; s += 32) dw[s] = 0.f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;
    const T* gate = kGated ? static_cast<const T*>(p.gate) + row * p.gate_stride : nullptr;
    const float r = p.rstd[row];
    Pack<T, N> x_cache[kSlots], dy_cache[kSlots], gate_cache[kGated ? kSlots : 1];
    // Pass 1: sum(dn n), the weight gradient (into this warp's shared row) and the gate gradient.
    float dot = 0.f;
    for_lane_vectors<kCache>(lane, vecs, [&](int k, int64_t v) {
      const Pack<T, N> x_pack = load_raw<T, N>(x + v * N);
      const Pack<T, N> dy_pack = load_raw<T, N>(dy + v * N);
      float a[N], g[N];
      unpack(x_pack, a);
      unpack(dy_pack, g);
      if constexpr (kCache > 0) {
        x_cache[k] = x_pack;
        dy_cache[k] = dy_pack;
      }
      if constexpr (kGated) {
        const Pack<T, N> z_pack = load_raw<T, N>(gate + v * N);
        if constexpr (kCache > 0) gate_cache[k] = z_pack;
        float z[N], dz[N];
        unpack(z_pack, z);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float w = load_float(p.weight, p.weight_dtype, v * N + i);
          const float n = mul_rn(a[i], r);
          const float n_rounded = round_to<T>(n);
          float prod = mul_rn(w, n_rounded);
          if (p.round_product) prod = round_to<T>(prod);
          const float sig = sigmoid(z[i]);
          const float dp = g[i] * (z[i] * sig);
          dz[i] = g[i] * prod * (sig * (1.0f + z[i] * (1.0f - sig)));
          dw[dweight_slot(v, i, N)] += dp * n_rounded;
          dot += (dp * w) * n;
        }
        store_pack<T, N>(static_cast<T*>(p.dgate) + row * p.dgate_stride + v * N, dz);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float w = load_float(p.weight, p.weight_dtype, v * N + i);
          const float n = mul_rn(a[i], r);
          dw[dweight_slot(v, i, N)] += g[i] * n;
          dot += g[i] * (1.0f + w) * n;
        }
      }
    });
    const float mean_dot = warp_sum(dot) / static_cast<float>(p.dim);
    // Pass 2: dx = r (dn - n mean(dn n)).
    T* dx = static_cast<T*>(p.y) + row * p.y_stride;
    for_lane_vectors<kCache>(lane, vecs, [&](int k, int64_t v) {
      float a[N], g[N], z[N], out[N];
      unpack(reuse<kCache>(x_cache, k, x + v * N), a);
      unpack(reuse<kCache>(dy_cache, k, dy + v * N), g);
      if constexpr (kGated) {
        unpack(reuse<kCache>(gate_cache, k, gate + v * N), z);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float w = load_float(p.weight, p.weight_dtype, v * N + i);
        const float n = mul_rn(a[i], r);
        float dn;
        if constexpr (kGated) {
          dn = g[i] * (z[i] * sigmoid(z[i])) * w;
        } else {
          dn = g[i] * (1.0f + w);
        }
        out[i] = r * (dn - n * mean_dot);
      }
      store_pack<T, N>(dx + v * N, out);
    });
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) {
    const int64_t slot = dweight_slot(j / N, static_cast<int>(j % N), N);
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += dweight_rows[w * row_floats + slot];
    p.partials[static_cast<int64_t>(blockIdx.x) * p.dim + j] = total;
  }
}

// dweight[j] = sum over the backward's blocks b of partials[b, j], in an order fixed by the shape
// (deterministic). A block of kReduceGroups warps owns 32 columns: lane c of warp g sums rows
// g, g + kReduceGroups, ... of column c (each warp load is 128 contiguous bytes of one row, and
// a thread has blocks / kReduceGroups loads to make, unrolled to keep several in flight), then
// warp 0 adds the kReduceGroups sums of its column in warp order. One thread per column walking
// all 1024 rows (the first version) took tens of microseconds on its own.
constexpr int kReduceGroups = 32;

__global__ void __launch_bounds__(kReduceGroups * 32)
    reduce_partials_kernel(const float* __restrict__ partials, int64_t blocks, int64_t dim,
                           void* dweight, DType dtype) {
  __shared__ float group_sums[kReduceGroups][33];  // +1: column reads of warp 0 hit 32 banks
  const int lane = threadIdx.x & 31;
  const int group = threadIdx.x >> 5;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  float total = 0.f;
  if (j < dim) {
#pragma unroll 8
    for (int64_t b = group; b < blocks; b += kReduceGroups) total += partials[b * dim + j];
  }
  group_sums[group][lane] = total;
  __syncthreads();
  if (group == 0 && j < dim) {
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < kReduceGroups; ++g) sum += group_sums[g][lane];
    store_any(dweight, dtype, j, sum);
  }
}

// The padded shared-memory row is at most dim + 31 * 8 floats, whatever the vector width.
constexpr int64_t kRowPadding = 31 * 8;
int backward_warps(int64_t dim) {
  return (dim + kRowPadding) * 4 * sizeof(float) <= kMaxStaticSmem ? 4 : 1;
}

// The backward grid: a function of the shape only (it sizes the workspace). Each block writes a
// D-float partial row, so long rows get fewer blocks (at D = 2048, 512 blocks: 4 MB of partials
// against 168 MB of x, dy, dx traffic, and 16 warps an SM with 8 vectors each in flight) and
// short rows more (at D = 128, 2048 blocks: 62 warps an SM to cover memory latency, with 1 MB
// of partials).
int64_t backward_blocks(const RowsShape& s) {
  const int warps = backward_warps(s.dim);
  const int64_t max_blocks =
      std::clamp<int64_t>(kBackwardPartialFloats / s.dim, kMinBackwardBlocks, kMaxBackwardBlocks);
  return std::min<int64_t>((s.rows + warps - 1) / warps, max_blocks);
}

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

// Register caching of the row (see for_lane_vectors): kCache vectors per lane, for the vector
// path only. 2 covers the per-head norms (D = 128, 256 in bf16) and 8 the hidden norms (D = 2048
// in bf16, 1024 in fp32); longer rows are read twice.
int cache_slots(int64_t dim, bool vector, int vec) {
  if (!vector) return 0;
  const int64_t vecs_per_lane = (dim / vec + 31) / 32;
  return vecs_per_lane <= 2 ? 2 : vecs_per_lane <= 8 ? 8 : 0;
}

template <typename T, int N, bool kGated>
void launch_forward_n(const RmsNormParams& p, int cache, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.rows + kForwardWarps - 1) / kForwardWarps);
  constexpr int kThreadsPerBlock = kForwardWarps * 32;
  switch (cache) {
    case 2: rms_norm_forward_kernel<T, N, kGated, 2><<<blocks, kThreadsPerBlock, 0, stream>>>(p); break;
    case 8: rms_norm_forward_kernel<T, N, kGated, 8><<<blocks, kThreadsPerBlock, 0, stream>>>(p); break;
    default: rms_norm_forward_kernel<T, N, kGated, 0><<<blocks, kThreadsPerBlock, 0, stream>>>(p); break;
  }
}

template <typename T, bool kGated>
void launch_forward(const RmsNormParams& p, bool vector, cudaStream_t stream) {
  if (vector) {
    launch_forward_n<T, kVec<T>, kGated>(p, cache_slots(p.dim, true, kVec<T>), stream);
  } else {
    rms_norm_forward_kernel<T, 1, kGated, 0>
        <<<static_cast<unsigned>((p.rows + kForwardWarps - 1) / kForwardWarps), kForwardWarps * 32,
           0, stream>>>(p);
  }
}

template <typename T, bool kGated>
void launch_backward(const RmsNormParams& p, bool vector, unsigned blocks, int warps,
                     cudaStream_t stream) {
  const unsigned threads = static_cast<unsigned>(warps * 32);
  constexpr int N = kVec<T>;
  const size_t smem =
      static_cast<size_t>(warps * dweight_row_floats(p.dim, vector ? N : 1)) * sizeof(float);
  if (!vector) {
    rms_norm_backward_kernel<T, 1, kGated, 0><<<blocks, threads, smem, stream>>>(p);
    return;
  }
  switch (cache_slots(p.dim, true, N)) {
    case 2: rms_norm_backward_kernel<T, N, kGated, 2><<<blocks, threads, smem, stream>>>(p); break;
    case 8: rms_norm_backward_kernel<T, N, kGated, 8><<<blocks, threads, smem, stream>>>(p); break;
    default: rms_norm_backward_kernel<T, N, kGated, 0><<<blocks, threads, smem, stream>>>(p); break;
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
    const int n = kVec<T>;
    const bool vector = s.dim % n == 0 && vector_aligned(in.x, n) && vector_aligned(out.y, n) &&
                        (!gated || vector_aligned(in.gate, n));
    if (gated) launch_forward<T, true>(p, vector, stream);
    else launch_forward<T, false>(p, vector, stream);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

size_t rms_norm_backward_workspace_bytes(const RowsShape& s) {
  return static_cast<size_t>(backward_blocks(s) * s.dim) * sizeof(float);
}

void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& a, const RowsShape& s) {
  check_value(backward_warps(s.dim) > 1 ||
                  (s.dim + kRowPadding) * sizeof(float) <= kMaxStaticSmem,
              "rms_norm_backward: the CUDA kernel handles D <= ",
              static_cast<int64_t>(kMaxStaticSmem / sizeof(float)) - kRowPadding,
              ", got D = ", s.dim);
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
  const int64_t blocks = backward_blocks(s);
  const int warps = backward_warps(s.dim);
  if (blocks > 0) {
    dispatch_float(in.x.dtype, [&](auto t) {
      using T = decltype(t);
      const int n = kVec<T>;
      const bool vector = s.dim % n == 0 && vector_aligned(in.x, n) && vector_aligned(a.dy, n) &&
                          vector_aligned(a.dx, n) &&
                          (!gated || (vector_aligned(in.gate, n) && vector_aligned(a.dgate, n)));
      if (gated) launch_backward<T, true>(p, vector, static_cast<unsigned>(blocks), warps, stream);
      else launch_backward<T, false>(p, vector, static_cast<unsigned>(blocks), warps, stream);
    });
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  }
  const unsigned reduce_blocks = static_cast<unsigned>((s.dim + 31) / 32);
  reduce_partials_kernel<<<reduce_blocks, kReduceGroups * 32, 0, stream>>>(
      p.partials, blocks, s.dim, a.dweight.data, a.dweight.dtype);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
