// rms_norm and rms_norm_gated on the GPU (include/flashdelta/rms_norm.h for the math).
//
// Forward: one warp per row, 4 rows per 128-thread block. A lane reads 16-byte vectors
// v = lane, lane + 32, ... of the row; pass 1 sums x^2 (fp32, butterfly shuffles: every lane gets
// the same total), pass 2 re-reads the row (L1/L2-resident: a warp touches D * sizeof(T) bytes)
// and writes y. rstd[row] is kept for the backward. One HBM read of x (and gate), one write of y.
// Backward: same warp-per-row walk, rows grid-strided over a fixed grid (kMaxBackwardBlocks at
// most, independent of the device, so the workspace size is a function of the shape only):
//   pass 1: dn (the gradient reaching n = x r), sum(dn n), the gate gradient, and the weight
//           gradient accumulated in the warp's own fp32 row of shared memory (a lane always owns
//           the same columns, so no atomics);
//   pass 2: dx = r (dn - n mean(dn n)).
// At the end the block adds its warps' rows in order into workspace[block, :], and a second
// kernel adds the blocks in order per column: deterministic, no float atomics.
// Vector path when D and every row stride are multiples of the vector width and the pointers are
// 16-byte aligned; otherwise the same kernels with one element per access.
// Assumes: backward D <= 12288 (shared memory for the per-warp weight-gradient rows).
#include "core/check.h"
#include "core/fused_ops_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kForwardWarps = 4;
constexpr int64_t kMaxBackwardBlocks = 1024;
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

template <typename T, int N, bool kGated>
__global__ void __launch_bounds__(kForwardWarps * 32)
    rms_norm_forward_kernel(const RmsNormParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kForwardWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const int64_t vecs = p.dim / N;
  float sum_sq = 0.f;
  for (int64_t v = lane; v < vecs; v += 32) {
    float a[N];
    load_pack<T, N>(x + v * N, a);
#pragma unroll
    for (int i = 0; i < N; ++i) sum_sq += a[i] * a[i];
  }
  sum_sq = warp_sum(sum_sq);
  const float r = rsqrtf(sum_sq / static_cast<float>(p.dim) + p.eps);
  if (lane == 0) p.rstd[row] = r;

  T* y = static_cast<T*>(p.y) + row * p.y_stride;
  const T* gate = kGated ? static_cast<const T*>(p.gate) + row * p.gate_stride : nullptr;
  for (int64_t v = lane; v < vecs; v += 32) {
    float a[N], out[N];
    load_pack<T, N>(x + v * N, a);
    if constexpr (kGated) {
      float z[N];
      load_pack<T, N>(gate + v * N, z);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float w = load_any(p.weight, p.weight_dtype, v * N + i);
        float prod = mul_rn(w, round_to<T>(mul_rn(a[i], r)));
        if (p.round_product) prod = round_to<T>(prod);
        out[i] = mul_rn(prod, silu(z[i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float w = load_any(p.weight, p.weight_dtype, v * N + i);
        out[i] = mul_rn(mul_rn(a[i], r), 1.0f + w);
      }
    }
    store_pack<T, N>(y + v * N, out);
  }
}

template <typename T, int N, bool kGated>
__global__ void rms_norm_backward_kernel(const RmsNormParams p) {
  extern __shared__ float dweight_rows[];  // [warps, dim]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  float* dw = dweight_rows + static_cast<int64_t>(warp) * p.dim;
  const int64_t vecs = p.dim / N;
  // Zero with the ownership pattern used below: each lane clears the columns it will add to.
  for (int64_t v = lane; v < vecs; v += 32) {
#pragma unroll
    for (int i = 0; i < N; ++i) dw[v * N + i] = 0.f;
  }
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;
    const T* gate = kGated ? static_cast<const T*>(p.gate) + row * p.gate_stride : nullptr;
    const float r = p.rstd[row];
    float dot = 0.f;
    for (int64_t v = lane; v < vecs; v += 32) {
      float a[N], g[N];
      load_pack<T, N>(x + v * N, a);
      load_pack<T, N>(dy + v * N, g);
      if constexpr (kGated) {
        float z[N], dz[N];
        load_pack<T, N>(gate + v * N, z);
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float w = load_any(p.weight, p.weight_dtype, v * N + i);
          const float n = mul_rn(a[i], r);
          const float n_rounded = round_to<T>(n);
          float prod = mul_rn(w, n_rounded);
          if (p.round_product) prod = round_to<T>(prod);
          const float sig = sigmoid(z[i]);
          const float dp = g[i] * (z[i] * sig);
          dz[i] = g[i] * prod * (sig * (1.0f + z[i] * (1.0f - sig)));
          dw[v * N + i] += dp * n_rounded;
          dot += (dp * w) * n;
        }
        store_pack<T, N>(static_cast<T*>(p.dgate) + row * p.dgate_stride + v * N, dz);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float w = load_any(p.weight, p.weight_dtype, v * N + i);
          const float n = mul_rn(a[i], r);
          dw[v * N + i] += g[i] * n;
          dot += g[i] * (1.0f + w) * n;
        }
      }
    }
    const float mean_dot = warp_sum(dot) / static_cast<float>(p.dim);
    T* dx = static_cast<T*>(p.y) + row * p.y_stride;
    for (int64_t v = lane; v < vecs; v += 32) {
      float a[N], g[N], out[N];
      load_pack<T, N>(x + v * N, a);
      load_pack<T, N>(dy + v * N, g);
      float z[N];
      if constexpr (kGated) load_pack<T, N>(gate + v * N, z);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float w = load_any(p.weight, p.weight_dtype, v * N + i);
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
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < p.dim; j += blockDim.x) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += dweight_rows[static_cast<int64_t>(w) * p.dim + j];
    p.partials[static_cast<int64_t>(blockIdx.x) * p.dim + j] = total;
  }
}

// dweight[j] = sum over blocks, in block order, of partials[block, j].
__global__ void reduce_partials_kernel(const float* __restrict__ partials, int64_t blocks,
                                       int64_t dim, void* dweight, DType dtype) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  float total = 0.f;
  for (int64_t b = 0; b < blocks; ++b) total += partials[b * dim + j];
  store_any(dweight, dtype, j, total);
}

int backward_warps(int64_t dim) { return dim * 4 * sizeof(float) <= kMaxStaticSmem ? 4 : 1; }

int64_t backward_blocks(const RowsShape& s) {
  const int warps = backward_warps(s.dim);
  return std::min<int64_t>((s.rows + warps - 1) / warps, kMaxBackwardBlocks);
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

template <typename T, bool kGated>
void launch_forward(const RmsNormParams& p, bool vector, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.rows + kForwardWarps - 1) / kForwardWarps);
  if (vector) {
    rms_norm_forward_kernel<T, kVec<T>, kGated><<<blocks, kForwardWarps * 32, 0, stream>>>(p);
  } else {
    rms_norm_forward_kernel<T, 1, kGated><<<blocks, kForwardWarps * 32, 0, stream>>>(p);
  }
}

template <typename T, bool kGated>
void launch_backward(const RmsNormParams& p, bool vector, unsigned blocks, int warps,
                     cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(warps) * p.dim * sizeof(float);
  if (vector) {
    rms_norm_backward_kernel<T, kVec<T>, kGated><<<blocks, warps * 32, smem, stream>>>(p);
  } else {
    rms_norm_backward_kernel<T, 1, kGated><<<blocks, warps * 32, smem, stream>>>(p);
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
  check_value(backward_warps(s.dim) > 1 || s.dim * sizeof(float) <= kMaxStaticSmem,
              "rms_norm_backward: the CUDA kernel handles D <= ", kMaxStaticSmem / sizeof(float),
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
  const unsigned reduce_blocks = static_cast<unsigned>((s.dim + 255) / 256);
  reduce_partials_kernel<<<reduce_blocks, 256, 0, stream>>>(p.partials, blocks, s.dim,
                                                            a.dweight.data, a.dweight.dtype);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
