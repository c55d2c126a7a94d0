// cp.async (sm_80+): global -> shared copies that hold no registers while in flight. A thread
// commits its copies in groups and waits until at most N of its groups are pending; the copies of
// the completed groups are then visible to the thread itself (other threads need a barrier).
#pragma once

#include <cuda_runtime.h>

namespace flashdelta::detail::cuda {

// 16 bytes, both addresses 16-byte aligned; cached in L2 only.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

// 4 bytes, both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem));
}

// 4, 8 or 16 bytes (both addresses aligned to it), of which the first `src_bytes` (0 or `kBytes`)
// are read and the rest zero-filled: src_bytes = 0 writes zeros without touching global memory.
// 16 bytes are cached in L2 only, smaller copies in L1 too (.cg takes 16 bytes only).
template <int kBytes>
__device__ __forceinline__ void cp_async_zfill(unsigned smem_addr, const void* gmem,
                                               int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr), "l"(gmem),
                 "n"(kBytes), "r"(src_bytes));
  }
}

// 16 bytes, or 16 zero bytes without reading global memory when `valid` is false (gmem may then
// point anywhere).
__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool valid) {
  cp_async_zfill<16>(static_cast<unsigned>(__cvta_generic_to_shared(smem)), gmem,
                     valid ? 16 : 0);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace flashdelta::detail::cuda
