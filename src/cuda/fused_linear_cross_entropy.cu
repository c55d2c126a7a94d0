// fused_linear_cross_entropy on CUDA: the causal-LM loss head without the [N, V] logits.
//
// What: loss_sum, num_valid and the gradients of loss_sum w.r.t. hidden [N, H] and (optionally)
// weight [V, H] (include/flashdelta/fused_linear_cross_entropy.h), all in the forward pass; the
// backward only scales them by grad_output / denominator.
//
// Algorithm: tokens are taken in chunks of C rows (src/core picks C so one chunk's logits take at
// most 512 MiB: C = 1024 at V = 248,320 in bf16). Per chunk, on the caller's stream:
//   1. Z = X_c W^T             cuBLAS, bf16/fp16/fp32 operands, fp32 accumulation, Z written in
//                              the inputs' dtype: exactly the logits F.linear gives transformers;
//   2. softmax_gradient_kernel one block per row: an online max / sum-of-exp pass over the row
//                              (fp32), logsumexp, the row's loss lse - z_t into a per-token fp32
//                              array, then a second pass writing D = softmax(z) - onehot(t) over Z
//                              in place, in the inputs' dtype. bf16 is what autograd hands the
//                              bf16 linear in transformers' path (the fp32 logit gradient is cast
//                              back to the logits' dtype), and it halves the traffic of the fp32
//                              round-trips that path makes;
//   3. dX_c = D W              cuBLAS, fp32 output (d_hidden_sum; rounded once, in the backward);
//   4. dW (+)= D^T X_c         cuBLAS, when the weight is trained: beta = 0 on the first chunk,
//                              1 after, accumulated in the weight's dtype (one rounding per chunk:
//                              8 at N = 8192; an fp32 accumulator would cost 2 GiB at this size).
//                              The backward scales this buffer in place and autograd takes it as
//                              the weight's gradient: one [V, H] buffer in all, which any
//                              implementation needs, and the op's memory beyond its gradients is
//                              the workspace (the logits chunk, 32 MiB for cuBLAS) and the fp32
//                              d_hidden_sum: 0.6 GiB at N = 8192, V = 248,320 in bf16.
// Precision of fp16: D is stored unscaled (the 1/N of a mean is applied in fp32 by the backward).
// Probabilities below fp16's normal range (6.1e-5; at V = 248,320 most are) are subnormal with
// an absolute error under 3e-8 each, which leaves d_hidden within 2e-4 of float64 at the test's
// sizes. transformers' fp16 path rounds (softmax - onehot) / N to fp16 instead, flushing most of
// the softmax mass to zero at N ~ 2000 (3% error): the tests compare with float64 there.
// Finally sum_losses_kernel adds the per-token losses and counts the valid targets in one block,
// in a fixed order (deterministic). GEMM FLOPs: 2NVH (logits) + 2NVH (dX) [+ 2NVH (dW)], the same
// as transformers' linear forward + backward; what goes is the fp32 logits, their fp32 gradient
// and the separate softmax / cross-entropy kernels (several GiB of traffic and memory).
//
// Launch shapes: softmax_gradient_kernel <<<rows of the chunk, 512>>>, 16-byte vector accesses
// when V is a multiple of the vector width (rows start 16-byte aligned then; the workspace is
// 256-byte aligned, checked: cuBLAS's part needs it); sum_losses_kernel <<<1, 1024>>>;
// scale_kernel grid-stride. cuBLAS runs on the caller's stream with the workspace's cuBLAS part
// bound (capturable without an eager call first: cuda/cublas.cuh).
//
// Assumes validated inputs (src/core): hidden with unit stride along H, weight contiguous. A
// target outside [0, V) that is not ignore_index makes that token's loss (hence the sum) NaN and
// its gradient row NaN: checking on the host would need a synchronisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/check.h"
#include "core/fused_linear_cross_entropy_backend.h"
#include "cuda/convert.cuh"
#include "cuda/cublas.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr int kSumThreads = 1024;
constexpr size_t kWorkspaceAlign = 256;

size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// The forward's workspace: one chunk's logits (then logit gradients) in the inputs' dtype, the
// per-token losses (fp32), and cuBLAS's workspace (bound to the handle for this call only, so
// that graph capture never makes cuBLAS allocate; see cuda/cublas.cuh). Byte offsets, 256-aligned.
struct WorkspaceLayout {
  size_t logits = 0, row_loss = 0, cublas = 0, total = 0;
};

WorkspaceLayout workspace_layout(const FusedLinearCrossEntropyShape& s, DType dtype) {
  WorkspaceLayout l;
  l.row_loss = l.logits + align_up(dtype_size(dtype) * size_t(s.chunk_rows * s.vocab_size));
  l.cublas = l.row_loss + align_up(sizeof(float) * size_t(s.num_tokens));
  l.total = l.cublas + align_up(kCublasWorkspaceBytes);
  return l;
}

// Running (max, sum of exp(x - max)) of a set of logits; empty: (-inf, 0).
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ void add_logit(MaxSum& a, float x) {
  if (x > a.max) {
    a.sum = a.sum * __expf(a.max - x) + 1.0f;  // a.max = -inf: 0 * 0 + 1
    a.max = x;
  } else {
    a.sum += __expf(x - a.max);  // NaN x lands here and poisons the sum, as it should
  }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.max == -INFINITY) return b;  // (an empty side carries no weight; avoids inf - inf)
  if (b.max == -INFINITY) return a;
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// Block-wide combine of every thread's MaxSum; the result is returned to all threads.
template <int kThreads>
__device__ MaxSum block_combine(MaxSum v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  __shared__ MaxSum warp_results[kThreads / 32];
  __shared__ MaxSum result;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset),
                       __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v = combine(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_results[lane] : MaxSum{-INFINITY, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset),
                         __shfl_xor_sync(0xffffffffu, v.sum, offset)};
      v = combine(v, other);
    }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// Vectors of kPack elements moved as one 16-byte access (kPack = 1: scalar accesses).
template <typename T, int kPack>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

// One block per token of the chunk: turns the row of logits into its gradient, in place, and
// writes the token's loss. `logits` rows have length (and stride) vocab_size.
template <typename T, typename Target, int kPack>
__global__ void __launch_bounds__(kRowThreads)
    softmax_gradient_kernel(T* __restrict__ logits, const Target* __restrict__ target,
                            int64_t target_stride, int64_t ignore_index, int64_t vocab_size,
                            float* __restrict__ row_loss) {
  const int64_t row = blockIdx.x;
  T* z = logits + row * vocab_size;
  using P = Pack<T, kPack>;
  P* zp = reinterpret_cast<P*>(z);
  const int64_t num_packs = vocab_size / kPack;  // kPack divides vocab_size (host check)
  const int64_t t = static_cast<int64_t>(target[row * target_stride]);

  if (t == ignore_index) {  // no loss, no gradient
    P zero;
#pragma unroll
    for (int e = 0; e < kPack; ++e) zero.v[e] = from_f32<T>(0.0f);
    for (int64_t p = threadIdx.x; p < num_packs; p += kRowThreads) zp[p] = zero;
    if (threadIdx.x == 0) row_loss[row] = 0.0f;
    return;
  }

  MaxSum ms{-INFINITY, 0.0f};
  for (int64_t p = threadIdx.x; p < num_packs; p += kRowThreads) {
    const P pack = zp[p];
#pragma unroll
    for (int e = 0; e < kPack; ++e) add_logit(ms, to_f32(pack.v[e]));
  }
  ms = block_combine<kRowThreads>(ms);
  const float lse = ms.max + logf(ms.sum);
  const bool valid = t >= 0 && t < vocab_size;
  if (threadIdx.x == 0) row_loss[row] = valid ? lse - to_f32(z[t]) : NAN;
  // Every thread has read its logits (and thread 0 z[t]) before anyone overwrites: the reads
  // above precede block_combine's barriers, and z[t] is read by thread 0 before the barrier here.
  __syncthreads();

  const float bad = valid ? 0.0f : NAN;  // an out-of-range target poisons its row
  for (int64_t p = threadIdx.x; p < num_packs; p += kRowThreads) {
    P pack = zp[p];
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      const int64_t j = p * kPack + e;
      const float prob = __expf(to_f32(pack.v[e]) - lse);
      pack.v[e] = from_f32<T>(prob - (j == t ? 1.0f : 0.0f) + bad);
    }
    zp[p] = pack;
  }
}

// One block: loss_sum = sum of the per-token losses, num_valid = count of non-ignored targets,
// both in a fixed order (thread-strided partial sums, then a fixed tree).
template <typename Target>
__global__ void __launch_bounds__(kSumThreads)
    sum_losses_kernel(const float* __restrict__ row_loss, const Target* __restrict__ target,
                      int64_t target_stride, int64_t ignore_index, int64_t num_tokens,
                      float* __restrict__ loss_sum, float* __restrict__ num_valid) {
  __shared__ double loss_part[kSumThreads];
  __shared__ int64_t count_part[kSumThreads];
  double loss = 0.0;
  int64_t count = 0;
  for (int64_t i = threadIdx.x; i < num_tokens; i += kSumThreads) {
    loss += row_loss[i];
    count += static_cast<int64_t>(target[i * target_stride]) != ignore_index;
  }
  loss_part[threadIdx.x] = loss;
  count_part[threadIdx.x] = count;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      loss_part[threadIdx.x] += loss_part[threadIdx.x + half];
      count_part[threadIdx.x] += count_part[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    loss_sum[0] = static_cast<float>(loss_part[0]);
    num_valid[0] = static_cast<float>(count_part[0]);
  }
}

// dst[e] = scale[0] * src[e], rounded to Dst; a zero stays zero whatever the scale (ignored tokens'
// gradients are exactly zero and torch sets them to 0 rather than multiplying: an all-ignored
// mean, scale 1/0, gives zero gradients as in transformers, not NaN). dst may be src (the weight
// gradient is scaled in place): each element is read and then written by one thread, so src and
// dst are deliberately not __restrict__.
template <typename Src, typename Dst>
__global__ void scale_kernel(const Src* src, const float* __restrict__ scale, Dst* dst,
                             int64_t count) {
  const float s = scale[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += stride) {
    const float x = to_f32(src[e]);
    dst[e] = from_f32<Dst>(x == 0.0f ? 0.0f : s * x);
  }
}

template <typename Fn>
void with_storage_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    case DType::kFloat16: fn(__half{}); break;
    default:
      fail(Error::Kind::kType, "fused_linear_cross_entropy: unsupported dtype ",
           dtype_name(dtype));
  }
}

template <typename T, typename Target>
void launch_softmax_gradient(T* logits, const Target* target, int64_t target_stride,
                             int64_t ignore_index, int64_t rows, int64_t vocab_size,
                             float* row_loss, cudaStream_t stream) {
  constexpr int kVecPack = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(logits) % 16 == 0;  // then every row is
  if (aligned && vocab_size % kVecPack == 0) {
    softmax_gradient_kernel<T, Target, kVecPack><<<static_cast<unsigned>(rows), kRowThreads, 0,
                                                   stream>>>(logits, target, target_stride,
                                                             ignore_index, vocab_size, row_loss);
  } else {
    softmax_gradient_kernel<T, Target, 1><<<static_cast<unsigned>(rows), kRowThreads, 0,
                                            stream>>>(logits, target, target_stride, ignore_index,
                                                      vocab_size, row_loss);
  }
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename Target>
void forward_impl(const FusedLinearCrossEntropyShape& s, const FusedLinearCrossEntropyInputs& in,
                  const FusedLinearCrossEntropyForwardOutputs& out) {
  const int64_t n = s.num_tokens, h = s.hidden_size, v = s.vocab_size;
  const int device = in.hidden.device.index;
  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(in.stream);
  const Target* target = static_cast<const Target*>(in.target.data);
  const int64_t target_stride = in.target.stride(0);
  float* loss_sum = static_cast<float*>(out.loss_sum.data);
  float* num_valid = static_cast<float*>(out.num_valid.data);

  if (n == 0) {
    if (in.weight_grad) {
      FLASHDELTA_CUDA_CHECK(cudaMemsetAsync(out.d_weight_sum.data, 0,
                                            dtype_size(in.weight.dtype) * size_t(v * h), stream));
    }
    sum_losses_kernel<Target><<<1, kSumThreads, 0, stream>>>(nullptr, target, target_stride,
                                                             in.ignore_index, 0, loss_sum,
                                                             num_valid);
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
    return;
  }

  const WorkspaceLayout layout = workspace_layout(s, in.hidden.dtype);
  uint8_t* ws = static_cast<uint8_t*>(out.workspace.data);
  if (reinterpret_cast<uintptr_t>(ws) % kWorkspaceAlign != 0) {  // cuBLAS's workspace needs it
    fail(Error::Kind::kValue, "fused_linear_cross_entropy: workspace must be ", kWorkspaceAlign,
         "-byte aligned on CUDA");
  }
  T* logits = reinterpret_cast<T*>(ws + layout.logits);
  float* row_loss = reinterpret_cast<float*>(ws + layout.row_loss);

  const cudaDataType type = cublas_data_type(in.hidden.dtype);
  const T* hidden = static_cast<const T*>(in.hidden.data);
  // Rows never overlap when N > 1 (src/core); a single row may carry any stride.
  const int64_t hidden_ld = std::max(in.hidden.stride(0), h);
  const BlasMatrix weight{in.weight.data, type, h};  // col-major [H, V]
  float* d_hidden = static_cast<float*>(out.d_hidden_sum.data);

  CublasSession blas(device, stream, ws + layout.cublas);
  for (int64_t c0 = 0; c0 < n; c0 += s.chunk_rows) {
    const int64_t rows = std::min(s.chunk_rows, n - c0);
    const BlasMatrix x_chunk{hidden + c0 * hidden_ld, type, hidden_ld};  // col-major [H, rows]
    // 1. Z^T [V, rows] = W [V, H] . X_c^T [H, rows]
    blas.gemm(true, false, v, rows, h, 1.0f, weight, x_chunk, 0.0f, logits, type, v,
              "fused_linear_cross_entropy logits");
    // 2. Z -> D in place, per-token losses
    launch_softmax_gradient<T, Target>(logits, target + c0 * target_stride, target_stride,
                                       in.ignore_index, rows, v, row_loss + c0, stream);
    const BlasMatrix d{logits, type, v};  // col-major [V, rows]
    // 3. dX_c^T [H, rows] = W^T [H, V] . D^T [V, rows]
    blas.gemm(false, false, h, rows, v, 1.0f, weight, d, 0.0f, d_hidden + c0 * h, CUDA_R_32F, h,
              "fused_linear_cross_entropy d_hidden");
    // 4. dW^T [H, V] (+)= X_c^T [H, rows] . D [rows, V]
    if (in.weight_grad) {
      blas.gemm(false, true, h, v, rows, 1.0f, x_chunk, d, c0 == 0 ? 0.0f : 1.0f,
                out.d_weight_sum.data, type, h, "fused_linear_cross_entropy d_weight");
    }
  }
  sum_losses_kernel<Target><<<1, kSumThreads, 0, stream>>>(
      row_loss, target, target_stride, in.ignore_index, n, loss_sum, num_valid);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

template <typename Src, typename Dst>
void launch_scale(const void* src, const void* scale, void* dst, int64_t count,
                  cudaStream_t stream) {
  if (count == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, int64_t{1} << 16);
  scale_kernel<Src, Dst><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const Src*>(src), static_cast<const float*>(scale), static_cast<Dst*>(dst),
      count);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyShape& s,
                                                  const FusedLinearCrossEntropyInputs& in) {
  if (s.num_tokens == 0) return 0;
  return workspace_layout(s, in.hidden.dtype).total;
}

void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyShape& s,
                                        const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out) {
  with_storage_type(in.hidden.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (in.target.dtype == DType::kInt64) {
      forward_impl<T, int64_t>(s, in, out);
    } else {
      forward_impl<T, int32_t>(s, in, out);
    }
  });
}

void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& a) {
  DeviceGuard guard(a.d_hidden_sum.device.index);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  with_storage_type(a.d_hidden.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_scale<float, T>(a.d_hidden_sum.data, a.grad_scale.data, a.d_hidden.data,
                           a.d_hidden.numel(), stream);
  });
  if (a.d_weight_sum.defined()) {
    with_storage_type(a.d_weight_sum.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch_scale<T, T>(a.d_weight_sum.data, a.grad_scale.data, a.d_weight.data,
                         a.d_weight.numel(), stream);
    });
  }
}

}  // namespace flashdelta::detail::cuda
