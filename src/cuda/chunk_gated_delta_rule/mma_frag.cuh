// Register-fragment helpers for the m16n8k16 products of the chunk kernels, beside the ones in
// common.cuh (whose mma.sync section documents the fragment layouts): A fragments read from a
// row-major tile, C fragments repacked as the next product's A operand, and a warp's 16-row
// output tile stored to global memory in 16-byte pieces through a warp-private staging buffer.
#pragma once

#include "cuda/chunk_gated_delta_rule/common.cuh"

namespace flashdelta::detail::cuda::chunk {

// The A fragment of the 16x16 block (m0, k0) of A(m, k) = X[m][k] (X row-major in shared
// memory, stride ld). Matrix j of the x4 load is rows m0 + (j & 1) * 8, columns k0 + (j >> 1) * 8:
// the order a0 (g, lo k), a1 (g + 8, lo k), a2 (g, hi k), a3 (g + 8, hi k) wants.
__device__ __forceinline__ void load_a_rows(uint32_t (&a)[4], const bf16* X, int ld, int m0,
                                            int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  ldmatrix_x4(a, X + (m0 + (j & 1) * 8 + r) * ld + k0 + (j >> 1) * 8);
}

// The A fragment of k16 block kk from the (fp32) C fragments of n8 tiles 2 kk and 2 kk + 1.
template <int kTiles>
__device__ __forceinline__ void pack_a_from_c(const float (&c)[kTiles][4], int kk,
                                              uint32_t (&a)[4]) {
  a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// A fragments shared within a warp group (the state passes): a warp keeps its own in registers
// and publishes them, one uint4 per lane, for the other warps to read from shared memory.
__device__ __forceinline__ uint4 as_uint4(const uint32_t (&a)[4]) {
  return make_uint4(a[0], a[1], a[2], a[3]);
}
__device__ __forceinline__ void to_regs(const uint4& x, uint32_t (&a)[4]) {
  a[0] = x.x, a[1] = x.y, a[2] = x.z, a[3] = x.w;
}

// Stores the warp's 16 x 128 fp32 C fragments (n8 tiles 0..15) as bf16 rows dst[0..15][0..127]
// (row stride 128, 16-byte aligned): the fragments go to `stage` (this warp's own bf16 [16, kLdD]
// buffer; the kLdD stride makes the 4-byte writes conflict-free), then each lane copies eight
// 16-byte pieces, a warp covering two whole rows (512 contiguous bytes) per instruction.
__device__ __forceinline__ void store_rows16x128(const float (&c)[16][4], bf16* stage,
                                                 bf16* dst) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 16; ++nt) {
    *reinterpret_cast<uint32_t*>(stage + g * kLdD + nt * 8 + 2 * t4) = pack_bf16(c[nt][0], c[nt][1]);
    *reinterpret_cast<uint32_t*>(stage + (g + 8) * kLdD + nt * 8 + 2 * t4) =
        pack_bf16(c[nt][2], c[nt][3]);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int i = j * 32 + lane, row = i >> 4, col = (i & 15) * 8;
    *reinterpret_cast<uint4*>(dst + row * kD + col) =
        *reinterpret_cast<const uint4*>(stage + row * kLdD + col);
  }
  __syncwarp();  // the buffer is rewritten by the next call
}

// Offset of (slot, key head hk)'s block of `elems` elements in a per-key-head workspace tensor
// (K and Q: Workspace::kn, qn).
__device__ __forceinline__ size_t ws_key_index(const ChunkParams& p, int64_t slot, int hk,
                                               int elems) {
  return (static_cast<size_t>(slot) * p.num_heads + hk) * elems;
}

// Synchronises the `threads` threads (whole warps) that use named barrier `id` (1..15; 0 is
// __syncthreads'), e.g. two warps exchanging fragments through shared memory.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace flashdelta::detail::cuda::chunk
