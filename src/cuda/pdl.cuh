// Programmatic dependent launch (sm_90 and later): a kernel launched by launch_dependent() may be
// scheduled while the kernel before it in the stream is still running. It calls
// wait_for_prerequisite() before it reads anything that kernel wrote: that returns once the
// whole prerequisite grid has finished and its writes are visible. The prerequisite may call
// allow_dependents() when it has only its last stores left, so that the dependent grid's blocks
// take the SMs its own blocks leave; without the call the dependent grid starts when it ends.
// What this saves is the launch gap between two kernels, ~0.6 us a pair on an H100 in a CUDA
// graph (session 12, the weight-gradient column sums after the rms_norm and conv backwards).
// Below sm_90 the device calls compile to nothing and the launch is a plain one. Stream capture
// records the dependency as a programmatic edge, so graphs keep it.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda {

__device__ __forceinline__ void wait_for_prerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch on devices
// that have it. The kernel must call wait_for_prerequisite() before reading its inputs.
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (device_info().major >= 9) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  FLASHDELTA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...));
}

}  // namespace flashdelta::detail::cuda
