// Device helpers shared by the mixture-of-experts CUDA kernels: loads and stores of any float
// storage dtype as fp32, and warp reductions in a fixed (butterfly) order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda::moe {

__device__ __forceinline__ float load_float(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[offset]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
}

__device__ __forceinline__ void store_float(void* base, DType dtype, int64_t offset, float x) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(base)[offset] = __float2half_rn(x); break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[offset] = __float2bfloat16_rn(x);
      break;
    default: static_cast<float*>(base)[offset] = x; break;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

}  // namespace flashdelta::detail::cuda::moe
