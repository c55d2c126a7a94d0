// Whether a kernel built for sm_90a (and, in the same build, for other architectures, where its
// body is a trap) runs its sm_90a code on the current device. The host asks before launching:
// a device of compute capability 9.0 may also run a JIT of another architecture's PTX (which
// reports ptxVersion 80), and the sm_90a-only paths (wgmma, TMA) must not launch there.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "cuda/cuda_check.cuh"

namespace flashdelta::detail::cuda {

// Checked once per device and kernel (the cache is per instantiation of kKernel). On the first
// check of a device whose code for kKernel is sm_90a, `prepare(attr, device)` says whether the
// kernel can run there (its shared memory) and opts it in (cudaFuncSetAttribute); its answer
// is cached with the rest.
template <auto kKernel, class Prepare>
bool sm90a_kernel_ready(Prepare&& prepare) {
  constexpr int kDevices = 64;
  static std::atomic<int> state[kDevices] = {};  // 0 unknown, 1 ready, 2 unavailable
  int device = 0;
  FLASHDELTA_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kDevices) {
    const int known = state[device].load(std::memory_order_acquire);
    if (known != 0) return known == 1;
  }
  cudaFuncAttributes attr{};
  FLASHDELTA_CUDA_CHECK(cudaFuncGetAttributes(&attr, kKernel));
  const bool ready = attr.binaryVersion == 90 && attr.ptxVersion >= 90 && prepare(attr, device);
  if (device < kDevices) state[device].store(ready ? 1 : 2, std::memory_order_release);
  return ready;
}

}  // namespace flashdelta::detail::cuda
