// Chunked gated delta rule, CUDA backward, the reverse state pass: the gradient dS of the state,
// carried backwards through the chunks (launch.cu, above backward(), has the whole picture).
//
// Per chunk, last to first, with W, KR, Qe, M from the forward's intra pass and dO from the
// caller (the CPU kernel's "dS_in" line: S' = e_last S + KR^T Vn, O = Qe S + M Vn, Vn = U - W S
// differentiated with respect to S):
//   store dS^T (bf16): the gradient of the state leaving this chunk, for the gradient kernel
//   dVn^T = dS^T KR^T + dO^T M                          [v, t]
//   dS^T <- e_last dS^T + dO^T Qe - dVn^T W             [v, k]
// Column v of dS depends only on column v of dS' and dO, so column tiles of V are independent
// blocks: (sequence, value head, V tile). The chain of dependent products per chunk is what bounds
// this pass, so each block splits it over 8 warps in kRowGroups x kSplit: warp w owns rows
// v = 16 (w % kRowGroups) .. + 15 of the tile and slice w / kRowGroups of k's kSplit, a
// 16 x (128 / kSplit) piece of dS^T in mma.sync accumulators. Two shapes:
//   64-column tiles, 4 row groups x 2 k halves     where B * HV * 2 blocks fill the SMs
//   32-column tiles, 2 row groups x 4 k quarters   where they would fill at most half of them
//                                                  (B * HV small, as the forward's state pass
//                                                  chooses): twice the blocks, and half of the
//                                                  64-column shape's chain per warp
// Per chunk, each warp:
//   1. its partial dVn^T: its k slice of dS^T KR^T and its t slice of dO^T M
//   2. stores the partial for the warps of its row group; meanwhile (no dependency on dVn^T)
//      dS^T <- e_last dS^T + dO^T Qe over its k slice, which covers the wait at the group's
//      named barrier
//   3. sums the group's partials in split order (the same order in every warp of the group:
//      they all hold the same dVn^T, bit for bit), then dS^T -= dVn^T W over its k slice.
// Per warp and chunk: 48 + 64 mma with k halves, 24 + 32 with k quarters (224 when one warp
// carried all of k). dS^T and dVn^T never leave registers except for that exchange.
// Streaming: W, KR, Qe, M of chunk c - 1 are copied by cp.async into the other half of a double
// buffer while chunk c is computed, and dO of chunk c - 1 (strided, any float dtype) is loaded
// into registers at the same time, converted to bf16 and stored to shared memory at the top of
// the next step. One block barrier per chunk (it both publishes chunk c's tiles and retires the
// buffers of chunk c + 1), one row-group barrier.
// Shared memory: 170 KB with 64-column tiles, 162 KB with 32 (Hopper; the backward's gradient
// kernel needs Hopper's shared memory anyway, check_grads_device()).
#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/bwd_frag.cuh"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/device_info.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

// kRowGroups x kSplit = 8 warps; the tile is 16 kRowGroups state columns (value dims) wide.
template <int kRowGroups, int kSplit>
struct Shape {
  static constexpr int kWarps = kRowGroups * kSplit;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kVT = 16 * kRowGroups;           // state columns (value dims) per block
  static constexpr int kLdO = kVT + 8;                  // 16-byte row padding
  static constexpr int kGroupsPerRow = kVT / 8;         // 8-element dO groups per row
  static constexpr int kGroupsPerThread = kC * kGroupsPerRow / kThreads;
  static constexpr int kKSlice = kD / kSplit;           // k per warp: dS^T columns
  static constexpr int kNT = kKSlice / 8;               // its n8 tiles
  static constexpr int kTBlocks = (kC / 16) / kSplit;   // k16 blocks of t per warp in dO^T M
  static_assert(kWarps == 8, "dstate blocks are 8 warps");
  static_assert(kSplit == 2 || kSplit == 4, "k split in halves or quarters");
  static_assert(kGroupsPerThread * kThreads == kC * kGroupsPerRow, "dO tile split evenly");
};

template <int kRowGroups, int kSplit>
struct DStateSmem {
  using S = Shape<kRowGroups, kSplit>;
  bf16 w[2][kC * kLdD];
  bf16 kr[2][kC * kLdD];
  bf16 qe[2][kC * kLdD];
  bf16 m[2][kC * kLdC];
  bf16 d_o[2][kC * S::kLdO];          // dO rows t, columns v of this tile
  float4 swap[S::kWarps][8][32];      // partial dVn^T per warp, [n8 tile][lane]: conflict-free
};

template <typename T, int kRowGroups, int kSplit>
__global__ void __launch_bounds__(Shape<kRowGroups, kSplit>::kThreads, 1)
    dstate_kernel(const ChunkParams p, bool d_o_vec) {
  using S = Shape<kRowGroups, kSplit>;
  constexpr int kThreads = S::kThreads, kVT = S::kVT, kLdO = S::kLdO;
  constexpr int kGroupsPerRow = S::kGroupsPerRow, kGroupsPerThread = S::kGroupsPerThread;
  constexpr int kNT = S::kNT, kTBlocks = S::kTBlocks;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  DStateSmem<kRowGroups, kSplit>& sm = *reinterpret_cast<DStateSmem<kRowGroups, kSplit>*>(smem_raw);
  const BackwardParams& b = p.bwd;
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  // rows v 16 row_group .. + 15 of the tile, k slice `split` of kSplit
  const int row_group = warp % kRowGroups, split = warp / kRowGroups;
  const int k_base = split * S::kKSlice;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const int vl = row_group * 16 + g;  // this thread's rows of dS^T, within the tile
  const int v_lo = col0 + vl, v_hi = v_lo + 8;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // dS^T: n8 tile nt covers k = k_base + 8 nt .. + 7 (as sc in state.cu, over a slice of k).
  float dsc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k_base + nt * 8 + 2 * t4 + j;
      float lo = 0.f, hi = 0.f;
      if (b.d_final_state && k < K) {
        const float* dht = b.d_final_state + n * b.dht_s[0] + hv * b.dht_s[1] + k * b.dht_s[2];
        if (v_lo < V) lo = dht[v_lo * b.dht_s[3]];
        if (v_hi < V) hi = dht[v_hi * b.dht_s[3]];
      }
      dsc[nt][j] = lo;
      dsc[nt][2 + j] = hi;
    }
  }

  auto prefetch_tiles = [&](int64_t c) {
    const int64_t slot = first_slot + c;
    const size_t base = ws_index(p, slot, hv, kC * kD);
    const int buf = c & 1;
    copy_in_async<kThreads>(p.ws.w + base, kD, kC, kD, sm.w[buf], kLdD);
    copy_in_async<kThreads>(p.ws.kr + base, kD, kC, kD, sm.kr[buf], kLdD);
    copy_in_async<kThreads>(p.ws.qe + base, kD, kC, kD, sm.qe[buf], kLdD);
    copy_in_async<kThreads>(p.ws.m + ws_index(p, slot, hv, kC * kC), kC, kC, kC, sm.m[buf],
                            kLdC);
    cp_async_commit();
  };
  // dO of chunk c, rows t < len, columns v < V of this tile, as bf16 groups of 8 columns:
  // group i = tid + j * kThreads is row i / kGroupsPerRow, columns 8 (i % kGroupsPerRow) ..
  const T* d_o = static_cast<const T*>(b.d_o) + seq.batch * b.d_o_s[0] + hv * b.d_o_s[2];
  uint4 d_o_next[kGroupsPerThread];
  auto load_d_o = [&](int64_t c) {
    const int64_t t0 = seq.begin + c * kC;
    const int len = static_cast<int>(seq.end - t0 < kC ? seq.end - t0 : kC);
#pragma unroll
    for (int j = 0; j < kGroupsPerThread; ++j) {
      const int i = tid + j * kThreads, t = i / kGroupsPerRow, v = col0 + (i % kGroupsPerRow) * 8;
      const int valid = t < len ? min(max(V - v, 0), 8) : 0;
      d_o_next[j] = valid > 0 ? bwd::load8_bf16<T>(d_o + (t0 + t) * b.d_o_s[1] + v * b.d_o_s[3],
                                                   b.d_o_s[3], valid, d_o_vec)
                              : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto gamma_last = [&](int64_t c) {
    return p.ws.gamma[ws_index(p, first_slot + c, hv, kC) + kC - 1];
  };

  float next_gamma_last = 0.f;
  if (num_chunks > 0) {
    prefetch_tiles(num_chunks - 1);
    load_d_o(num_chunks - 1);
    next_gamma_last = gamma_last(num_chunks - 1);
  }

  for (int64_t c = num_chunks - 1; c >= 0; --c) {
    const int64_t slot = first_slot + c;
    const int buf = c & 1;
    const float e_last = __expf(next_gamma_last);

    // dS^T here is the gradient of the state leaving chunk c: this warp's slice.
    bf16* dst = b.dstates + ws_index(p, slot, hv, kD * kD);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int k = k_base + nt * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(dst + v_lo * kD + k) = pack_bf16(dsc[nt][0], dsc[nt][1]);
      *reinterpret_cast<uint32_t*>(dst + v_hi * kD + k) = pack_bf16(dsc[nt][2], dsc[nt][3]);
    }

    // Chunk c's dO, loaded during the previous step, into its buffer (last read two steps ago).
#pragma unroll
    for (int j = 0; j < kGroupsPerThread; ++j) {
      const int i = tid + j * kThreads;
      *reinterpret_cast<uint4*>(&sm.d_o[buf][(i / kGroupsPerRow) * kLdO + (i % kGroupsPerRow) * 8]) =
          d_o_next[j];
    }
    cp_async_wait<0>();  // this thread's copies of chunk c's tiles
    // Chunk c's tiles and dO are visible to all warps; every warp is done with chunk c + 1, whose
    // buffers (and the swap area) are free.
    __syncthreads();
    if (c > 0) {
      prefetch_tiles(c - 1);
      load_d_o(c - 1);
      next_gamma_last = gamma_last(c - 1);
    }

    uint32_t doa[4][4];  // dO^T's A fragments: rows v of this warp, columns t (k16 blocks)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) load_a_cols(doa[kk], sm.d_o[buf], kLdO, row_group * 16, kk * 16);

    // 1. partial dVn^T = dS^T[:, k slice] KR^T[k slice, :] + dO^T[:, t slice] M[t slice, :].
    float dvn[8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      uint32_t a[4];
      pack_a_from_c(dsc, kk, a);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_rows(bb, sm.kr[buf], kLdD, np * 16, k_base + kk * 16);
        mma_bf16(dvn[2 * np], a, bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], a, bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kk / kTBlocks != split) continue;  // warp-uniform; kk stays a constant (doa in registers)
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, sm.m[buf], kLdC, np * 16, kk * 16);
        mma_bf16(dvn[2 * np], doa[kk], bb[0], bb[1]);
        mma_bf16(dvn[2 * np + 1], doa[kk], bb[2], bb[3]);
      }
    }

    // 2. the partial out to the row group; dS^T[:, k slice] <- e_last dS^T + dO^T Qe[:, k slice]
    // while the other warps of the group finish theirs.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      sm.swap[warp][nt][lane] = make_float4(dvn[nt][0], dvn[nt][1], dvn[nt][2], dvn[nt][3]);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dsc[nt][e] *= e_last;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, sm.qe[buf], kLdD, k_base + np * 16, kk * 16);
        mma_bf16(dsc[2 * np], doa[kk], bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], doa[kk], bb[2], bb[3]);
      }
    }

    // 3. dVn^T = the group's partials summed in split order; dS^T[:, k slice] -= dVn^T W.
    // The warp's own partial comes from its registers (the bits it stored), the others' from
    // shared memory: a quarter fewer reads of the exchange with k in quarters, half with halves.
    named_barrier(1 + row_group, 32 * kSplit);
    float sum[8][4];
#pragma unroll
    for (int s = 0; s < kSplit; ++s) {
      const bool own = s == split;  // warp-uniform
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        float4 o;
        if (own) o = make_float4(dvn[nt][0], dvn[nt][1], dvn[nt][2], dvn[nt][3]);
        else o = sm.swap[row_group + s * kRowGroups][nt][lane];
        if (s == 0) sum[nt][0] = o.x, sum[nt][1] = o.y, sum[nt][2] = o.z, sum[nt][3] = o.w;
        else sum[nt][0] += o.x, sum[nt][1] += o.y, sum[nt][2] += o.z, sum[nt][3] += o.w;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dvn[nt][e] = -sum[nt][e];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t va[4];
      pack_a_from_c(dvn, kk, va);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        load_b_cols(bb, sm.w[buf], kLdD, k_base + np * 16, kk * 16);
        mma_bf16(dsc[2 * np], va, bb[0], bb[1]);
        mma_bf16(dsc[2 * np + 1], va, bb[2], bb[3]);
      }
    }
  }

  if (b.d_initial_state) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int k = k_base + nt * 8 + 2 * t4 + j;
        if (k >= K) continue;
        float* dh0 = b.d_initial_state + n * b.dh0_s[0] + hv * b.dh0_s[1] + k * b.dh0_s[2];
        if (v_lo < V) dh0[v_lo * b.dh0_s[3]] = dsc[nt][j];
        if (v_hi < V) dh0[v_hi * b.dh0_s[3]] = dsc[nt][2 + j];
      }
    }
  }
}

template <typename T, int kRowGroups, int kSplit>
void launch(const ChunkParams& p, cudaStream_t stream) {
  using S = Shape<kRowGroups, kSplit>;
  const size_t smem = sizeof(DStateSmem<kRowGroups, kSplit>);
  auto* kernel = dstate_kernel<T, kRowGroups, kSplit>;
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + S::kVT - 1) / S::kVT);
  const bool vec = bwd::rows_vectorisable<T>(p.bwd.d_o, p.bwd.d_o_s, p.head_v_dim);
  kernel<<<grid, S::kThreads, smem, stream>>>(p, vec);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const int64_t wide_blocks =
      static_cast<int64_t>(p.num_seqs) * p.num_v_heads * ((p.head_v_dim + 63) / 64);
  if (2 * wide_blocks <= device_info().sm_count) launch<T, 2, 4>(p, stream);
  else launch<T, 4, 2>(p, stream);
}

}  // namespace

size_t dstate_smem_bytes() {
  const size_t wide = sizeof(DStateSmem<4, 2>), narrow = sizeof(DStateSmem<2, 4>);
  return wide > narrow ? wide : narrow;
}

void launch_dstate(const ChunkParams& p, cudaStream_t stream) {
  switch (p.bwd.d_o_dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
