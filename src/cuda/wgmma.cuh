// Hopper warpgroup MMAs (wgmma.mma_async, sm_90a) on shared-memory operands, shared by the MoE
// grouped GEMM (moe_grouped_gemm_sm90*.cuh: m64n128 / m64n256 per warpgroup) and the gated delta
// rule's gradient kernel (chunk_gated_delta_rule/grads.cu: m64n32 / m64n16 per warpgroup); with
// the A operand in registers (wgmma_rs_bf16: m64n64 / m64n128), its state pass (state_wgmma.cu).
//
// Operands live in shared memory in the 128-byte swizzled layout (what TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B): rows of 64 two-byte elements (128 bytes), 16-byte chunk j of row
// r at chunk j ^ (r % 8), 8-row groups of 1024 bytes, each 1024-byte aligned. A descriptor names
// a start address, the stride between 8-row groups (SBO) and, for MN-major operands, the stride
// between 64-element column boxes (LBO); the hardware applies the swizzle to the final address,
// so a start inside a row (the k16 step of a K-major operand, the column offset of an MN-major
// one) needs no other change.
//
// Ordering: the MMAs read shared memory through the async proxy. Shared-memory writes of the
// generic proxy (stores, cp.async) must be followed by fence_proxy_async() (tma.cuh) in the writing
// threads before the barrier that publishes them to the MMAs. Accumulator registers written by
// ordinary instructions need wgmma_fence() before the first MMA that reads them, and results
// are valid only after wgmma_commit() and wgmma_wait<0>().
//
// Everything here compiles to nothing outside sm_90a; callers guard their use with
// __CUDA_ARCH_FEAT_SM90_ALL.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/tma.cuh"  // fence_proxy_async

namespace flashdelta::detail::cuda {

// A shared-memory matrix descriptor for the 128-byte swizzle (layout type 1 in bits 62-63),
// base offset 0 (every 8-row group is 1024-byte aligned). Byte offsets are encoded >> 4.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t lbo_bytes,
                                                    uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Keeps the compiler from moving accumulator reads and writes across the asynchronous MMAs
// (the MoE kernels' flat accumulator arrays, the chunk kernels' [n8 tile][4] ones).
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int NT>
__device__ __forceinline__ void fence_accumulators(float (&d)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) fence_accumulators(d[nt]);
}

// The same for register A fragments (wgmma_rs_bf16): their packing must be done before
// wgmma_fence(), or ptxas re-fences and serialises the MMAs.
template <int N>
__device__ __forceinline__ void fence_fragments(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// D[64 x 8 NT] (+)= A[64 x 16] B[16 x 8 NT], bf16 operands from shared memory (descriptors),
// fp32 accumulators in the m16n8 layout of mma.sync per warp (warp w % 4 of the warpgroup holds
// rows 16 (w % 4) + lane / 4 and + 8; d[nt] covers columns 8 nt + 2 (lane % 4) + 0..1): the
// layout the chunk kernels' epilogues take. kTransA / kTransB: the operand is MN-major.
// accumulate = 0 makes it D = A B, ignoring D's contents. NT = 2 (m64n16) or 4 (m64n32).
template <int NT, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_bf16(float (&d)[NT][4], uint64_t desc_a, uint64_t desc_b,
                                           int accumulate) {
  static_assert(NT == 2 || NT == 4, "wgmma_bf16: m64n16 or m64n32");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (NT == 4) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, %19, %20;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),
          "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),
          "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),
          "+f"(d[3][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA ? 1 : 0),
          "n"(kTransB ? 1 : 0));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, %11, %12;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),
          "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA ? 1 : 0),
          "n"(kTransB ? 1 : 0));
  }
#endif
}

// D[64 x 8 NT] (+)= A[64 x 16] B[16 x 8 NT] with A from registers: each warp's A fragment for its
// 16 rows of the warpgroup's 64, in the mma.sync m16n8k16 layout (pack_a_from_c of an accumulator
// block gives it). B from shared memory as in wgmma_bf16 (kTransB: MN-major). The A registers
// must stay unchanged until the MMA has completed (wgmma_wait). NT = 8 (m64n64) or 16 (m64n128).
template <int NT, bool kTransB>
__device__ __forceinline__ void wgmma_rs_bf16(float (&d)[NT][4], const uint32_t (&a)[4],
                                              uint64_t desc_b, int accumulate) {
  static_assert(NT == 8 || NT == 16, "wgmma_rs_bf16: m64n64 or m64n128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (NT == 8) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),
          "n"(kTransB ? 1 : 0));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
          "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
          "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
          "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
          "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
          "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
          "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
          "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),
          "n"(kTransB ? 1 : 0));
  }
#endif
}

}  // namespace flashdelta::detail::cuda
