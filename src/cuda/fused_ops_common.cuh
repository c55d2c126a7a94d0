// Device helpers shared by the fused layer op kernels (rms_norm.cu, gated_product.cu,
// partial_rotary_embedding.cu): fp32 <-> storage conversions, rounding to the storage type,
// 16-byte vector loads and stores, and the alignment test that picks the vector path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/convert.cuh"
#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda::fused {


// x rounded to T and back: what a torch op producing a T tensor does to its fp32 result.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_f32(from_f32<T>(x));
}

// Products and sums that a torch composition rounds separately: never contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }

// N consecutive elements of T; N * sizeof(T) == 16 on the vector path, N == 1 on the scalar one.
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(pack.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// torch's formulas for the activations, operation for operation (expf, not __expf).
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// True when t (rank <= kMaxRank, unit inner stride) can be read in 16-byte vectors of `vec`
// elements: aligned base, every outer stride a multiple of vec.
inline bool vector_aligned(const TensorRef& t, int vec) {
  if (reinterpret_cast<uintptr_t>(t.data) % (vec * dtype_size(t.dtype)) != 0) return false;
  for (int d = 0; d + 1 < t.rank; ++d) {
    if (t.shape[d] > 1 && t.strides[d] % vec != 0) return false;
  }
  return true;
}

// Calls f(T{}) for the storage type of dtype.
template <typename F>
inline void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    default: f(float{}); break;
  }
}

}  // namespace flashdelta::detail::cuda::fused
