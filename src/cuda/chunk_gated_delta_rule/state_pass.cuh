// What the state passes (state.cu on mma.sync, state_wgmma.cu on wgmma, and for the state
// tensors dstate.cu) share around their products: a chunk's tile copies, the thread's part of
// S^T (or dS^T) from and to the [N, HV, K, V] state tensors, and o's rows from the staging tile.
#pragma once

#include <cstdint>

#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"
#include "cuda/chunk_gated_delta_rule/tiles.cuh"

namespace flashdelta::detail::cuda::chunk {

// Starts the copies of chunk `slot`'s tiles into buffer `buf` of a state pass's shared memory
// (Smem: w, k, q, m, u, gamma and the full barriers, as StateSmem / WgSmem): W, K (and Q, M:
// kWithQM) by load_chunk_tiles, this block's kVT columns of U from col0 and gamma by cp.async,
// committed as one group.
template <bool kTma, bool kWithQM, int kThreads, int kVT, int kLdU, class Smem>
__device__ __forceinline__ void prefetch_chunk(const ChunkParams& p, const ChunkTileMaps& maps,
                                               Smem& sm, int64_t slot, int hv, int hk, int col0,
                                               int buf) {
  const size_t base = ws_index(p, slot, hv, kC * kD);
  load_chunk_tiles<kTma, kWithQM, kThreads>(
      p, maps, static_cast<int64_t>(base / kD), static_cast<int64_t>(ws_key_index(p, slot, hk, kC)),
      sm.w[buf], sm.k[buf], sm.q[buf], sm.m[buf], shared_address(&sm.full[buf]));
  if (threadIdx.x < kC / 4)
    cp_async_16(sm.gamma[buf] + 4 * threadIdx.x,
                p.ws.gamma + ws_index(p, slot, hv, kC) + 4 * threadIdx.x);
  copy_tile_async<kThreads, kC, kVT, kD, RowTile<kLdU>>(p.ws.u + base + col0, sm.u[buf]);
  cp_async_commit();
}

// The thread's part of a [N, HV, K, V] fp32 state (initial or final S, or their gradients) as
// S^T in the mma accumulator layout: rows v_lo and v_lo + 8, n8 tile nt at k = k_base + 8 nt +
// 2 (lane % 4) + {0, 1}, of sequence n and value head hv; h with strides st. A null h loads
// zeros and stores nothing. Rows past V and columns past K are neither read nor written.
template <int kNT>
__device__ __forceinline__ void load_state_part(const float* h, const int64_t* st,
                                                const ChunkParams& p, int64_t n, int hv,
                                                int v_lo, int k_base, float (&s)[kNT][4]) {
  const int t4 = threadIdx.x & 3, v_hi = v_lo + 8;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k_base + nt * 8 + 2 * t4 + j;
      float lo = 0.f, hi = 0.f;
      if (h && k < p.head_k_dim) {
        const float* row = h + n * st[0] + hv * st[1] + k * st[2];
        if (v_lo < p.head_v_dim) lo = row[v_lo * st[3]];
        if (v_hi < p.head_v_dim) hi = row[v_hi * st[3]];
      }
      s[nt][j] = lo;
      s[nt][2 + j] = hi;
    }
  }
}
template <int kNT>
__device__ __forceinline__ void store_state_part(float* h, const int64_t* st,
                                                 const ChunkParams& p, int64_t n, int hv,
                                                 int v_lo, int k_base, const float (&s)[kNT][4]) {
  if (!h) return;
  const int t4 = threadIdx.x & 3, v_hi = v_lo + 8;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k_base + nt * 8 + 2 * t4 + j;
      if (k >= p.head_k_dim) continue;
      float* row = h + n * st[0] + hv * st[1] + k * st[2];
      if (v_lo < p.head_v_dim) row[v_lo * st[3]] = s[nt][j];
      if (v_hi < p.head_v_dim) row[v_hi * st[3]] = s[nt][2 + j];
    }
  }
}

// o's rows for one block (sequence, value head hv, columns col0 .. col0 + kVT - 1): a chunk's
// rows from a staging tile o[t][kLdO] (after a block barrier that follows its writes), 16-byte
// stores where o's layout allows (the usual contiguous [B, T, HV, V] output), else elementwise.
template <typename T, int kThreads, int kVT, int kLdO>
struct OutputRows {
  static constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  T* base;  // o of (batch, token 0, hv)
  int64_t row_stride, col_stride;
  int col0, V;
  bool vec;

  __device__ OutputRows(const ChunkParams& p, const Seq& seq, int hv, int col0_)
      : base(p.o ? static_cast<T*>(p.o) + seq.batch * p.o_s[0] + hv * p.o_s[2] : nullptr),
        row_stride(p.o_s[1]), col_stride(p.o_s[3]), col0(col0_), V(p.head_v_dim) {
    vec = p.o_s[3] == 1 && (p.o_s[1] * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(base) % 16 == 0;
  }

  // rows t < len of the chunk starting at token t0
  __device__ __forceinline__ void store(const T* staged, int64_t t0, int len) const {
    for (int i = threadIdx.x; i < kC * (kVT / kPer); i += kThreads) {
      const int t = i / (kVT / kPer), v = (i % (kVT / kPer)) * kPer;
      if (t >= len) continue;
      const T* src = staged + t * kLdO + v;
      T* dst = base + (t0 + t) * row_stride + static_cast<int64_t>(col0 + v) * col_stride;
      if (vec && col0 + v + kPer <= V) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int j = 0; j < kPer; ++j)
          if (col0 + v + j < V) dst[j * col_stride] = src[j];
      }
    }
  }
};

}  // namespace flashdelta::detail::cuda::chunk
