// Conversions every CUDA kernel of flashdelta shares: a storage value (fp32, fp16, bf16) to fp32
// and back (round to nearest even), and one element of a tensor whose float dtype is known only
// at run time (gates, weights, states that transformers keeps in another dtype than q/k/v).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda {

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

// Element i of a tensor of float dtype `dtype` (fp32, fp16 or bf16), as fp32.
__device__ __forceinline__ float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Element i of a tensor of float dtype `dtype` (fp32, fp16 or bf16) set to x (round to nearest
// even): gradients of such tensors.
__device__ __forceinline__ void store_float(void* p, DType dtype, int64_t i, float x) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    default: static_cast<float*>(p)[i] = x; break;
  }
}

}  // namespace flashdelta::detail::cuda
