// What the CUDA kernels need to know about a device to pick their launch shapes: multiprocessor
// count (to size persistent grids), the shared memory a block may opt in to (to choose tile
// sizes and set cudaFuncAttributeMaxDynamicSharedMemorySize), L2 size and compute capability.
//
// Read once per device (cudaDeviceGetAttribute, one attribute at a time: cudaGetDeviceProperties
// fills ~100 fields and costs far more) and cached, so a launch can ask every time. Thread-safe;
// no allocation on the device, no synchronisation: legal while a CUDA graph is being captured.
#pragma once

#include <cstddef>

namespace flashdelta::detail::cuda {

struct DeviceInfo {
  int device = 0;
  int major = 0, minor = 0;           // compute capability
  int sm_count = 0;                   // multiprocessors
  int max_smem_per_block_optin = 0;   // bytes a block can get after cudaFuncSetAttribute
  int max_smem_per_sm = 0;            // bytes of shared memory per multiprocessor
  int l2_bytes = 0;
  bool is_sm90 = false;               // Hopper (H100/H200): wgmma and TMA paths apply
};

// The device's properties; `device` < 0 means the calling thread's current device.
// Throws flashdelta::Error(kRuntime) when the device cannot be queried.
const DeviceInfo& device_info(int device = -1);

// Blocks of `kernel` (`threads` each, `smem` bytes of dynamic shared memory) that the whole device
// holds at once, at least one per multiprocessor: the size of a persistent grid, or of one wave.
// The occupancy query is a driver call: cached per (kernel, threads, smem, device).
long long resident_blocks(const void* kernel, int threads, size_t smem, int device = -1);

}  // namespace flashdelta::detail::cuda
