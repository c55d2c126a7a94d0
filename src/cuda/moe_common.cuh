// Device helpers shared by the mixture-of-experts CUDA kernels: warp reductions in a fixed
// (butterfly) order. (Loads and stores of any float dtype as fp32 are convert.cuh's.)
#pragma once

#include <cuda_runtime.h>

namespace flashdelta::detail::cuda::moe {

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
