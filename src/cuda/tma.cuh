// mbarriers and TMA loads (sm_90): the TMA unit copies a box of a tensor into shared memory and
// counts the bytes it delivered on an mbarrier; threads wait on the barrier's phase instead of on
// their own cp.async groups. A phase completes when its expected arrivals have arrived and the
// bytes announced by arrive_expect_tx have all landed.
//
// Everything here compiles to nothing below sm_90; callers choose the path on the host
// (device_info().is_sm90) and keep a cp.async one for older devices.
#pragma once

#include <cuda.h>  // CUtensorMap (type only)
#include <cuda_runtime.h>

#include <cstdint>

namespace flashdelta::detail::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

// After the initialising thread's mbarrier_init calls, before the barrier that publishes them:
// makes the initialised barriers visible to the async proxy (the TMA unit) too.
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Orders this thread's generic-proxy shared-memory writes (stores, cp.async) before later
// async-proxy accesses (wgmma reads, TMA stores) that a barrier makes wait for them.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Byte offset of the element pair (col, col + 1) (col even; 2-byte elements) of row `row` in
// shared memory laid out as TMA writes a box of kRowBytes-byte rows with the kRowBytes-byte
// swizzle (the box 8-row aligned): 16-byte chunk c of row r at (c ^ s(r)) * 16, s(r) =
// (r * kRowBytes / 128) mod the row's chunk count (r % 8 for 128-byte rows, (r / 2) % 4 for
// 64-byte ones). Both are conflict-free for the mma accumulator layout (a warp's 8 rows x 4 column
// pairs of one chunk) and for whole-chunk accesses.
template <int kRowBytes = 128>
__device__ __forceinline__ int tma_swizzle_offset(int row, int col) {
  static_assert(kRowBytes == 128 || kRowBytes == 64, "128- or 64-byte swizzle");
  constexpr int kChunks = kRowBytes / 16;
  const int key = (row * kRowBytes / 128) % kChunks;
  return row * kRowBytes + (((col / 8) ^ key) * 16) + (col % 8) * 2;
}

// One arrival, and `bytes` more expected in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

// Blocks until the phase of parity `parity` of the barrier has completed. A phase that never
// completes (a transaction count that cannot be met: a bug) traps after 2^26 polls (seconds at
// least; a legitimate wait is microseconds) instead of hanging the device.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  uint32_t polls = 0;
  do {
    if (++polls == (1u << 26)) __trap();
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

// The box of a 2D tensor map at coordinates (c0 along the contiguous dimension, c1) into shared
// memory at `dst` (the map's swizzle decides the layout there), counted on `bar` when it lands.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
#endif
}

// stmatrix (sm_90): a warp's four 8 x 8 bf16 matrices from mma accumulator fragments (r0..r3,
// a pair of columns per lane) to shared memory, lanes 8 i .. 8 i + 7 giving matrix i's row
// addresses.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

// A box of shared memory at `src` to a 2D tensor map at coordinates (c0, c1), as a bulk group of
// its own (tma_store_wait waits for it).
__device__ __forceinline__ void tma_store_tile(const CUtensorMap* map, uint32_t src, int32_t c0,
                                               int32_t c1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
      "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1)
      : "memory");
#endif
}

// kRead: until the stores' shared-memory reads are done (the tile may be rewritten); else until
// the stores are complete.
template <bool kRead>
__device__ __forceinline__ void tma_store_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kRead) {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
  } else {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
#endif
}

}  // namespace flashdelta::detail::cuda
