// Chunked gated delta rule, CUDA, phase 2 of 3: the state pass, the only sequential part.
//
// Per (sequence, value head, 32-column tile of V), 128 threads (4 warps), chunks in order:
//   store S (bf16) as the chunk's incoming state          (phase 3 and the backward read it)
//   Vn = U - W S                                           64 x 32, tensor cores, K = 128
//   S  = exp(gamma_last) S + KR^T Vn                       128 x 32, K = 64
// S lives in fp32 accumulator fragments for the whole sequence (warp w owns rows 32w..32w+31);
// the product W S takes a bf16 copy of it from shared memory. W, U, KR, gamma come from phase 1.
// With 32-column tiles a single sequence of 32 value heads runs 128 blocks: enough for the
// H100's 132 SMs only when N * HV >= 32; segment-parallel passes are the next step for long
// single sequences (bench/NOTES.md).
#include "cuda/chunk_gated_delta_rule/kernels.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kThreads = 128;
constexpr int kVT = 32;          // state columns per block
constexpr int kLdT = kVT + 8;    // bf16 stride of a [*, 32] tile
constexpr int kLdTf = kVT + 4;   // fp32 stride

struct StateSmem {
  bf16 w[2][kC * kLdD];    // double-buffered: chunk c + 1 streams in while c is computed
  bf16 kr[2][kC * kLdD];
  bf16 u[2][kC * kLdT];
  union {
    float sf[kD * kLdTf];  // S (fp32) staging
    float vf[kC * kLdTf];  // W S
  };
  bf16 sb[kD * kLdT];      // S (bf16), the operand of W S
  bf16 vn[kC * kLdT];      // Vn (bf16), the operand of the update
};

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

__global__ void __launch_bounds__(kThreads, 2) state_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  StateSmem& sm = *reinterpret_cast<StateSmem*>(smem_raw);
  const int64_t n = blockIdx.x;
  const int hv = blockIdx.y, col0 = blockIdx.z * kVT;
  const int warp = threadIdx.x >> 5;
  const int K = p.head_k_dim, V = p.head_v_dim;
  const Seq seq = sequence(p, n);
  const int64_t num_chunks = (seq.end - seq.begin + kC - 1) / kC;
  const int64_t first_slot = slot_begin(p, n);

  // S <- initial state (or zeros), through shared memory into the fragments.
  for (int i = threadIdx.x; i < kD * kVT; i += kThreads) {
    const int r = i / kVT, c = i % kVT;
    float x = 0.f;
    if (p.initial_state && r < K && col0 + c < V)
      x = p.initial_state[n * p.h0_s[0] + hv * p.h0_s[1] + r * p.h0_s[2] + (col0 + c) * p.h0_s[3]];
    sm.sf[r * kLdTf + c] = x;
  }
  __syncthreads();
  Acc S[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::load_matrix_sync(S[i][j], sm.sf + (warp * 32 + i * 16) * kLdTf + j * 16, kLdTf,
                             wmma::mem_row_major);

  auto prefetch = [&](int64_t c) {
    const size_t base = ws_index(p, first_slot + c, hv, kC);
    const int buf = c & 1;
    copy_in_async<kThreads>(p.ws.w + base, kD, kC, kD, sm.w[buf], kLdD);
    copy_in_async<kThreads>(p.ws.kr + base, kD, kC, kD, sm.kr[buf], kLdD);
    copy_in_async<kThreads>(p.ws.u + base + col0, kD, kC, kVT, sm.u[buf], kLdT);
    cp_async_commit();
  };
  if (num_chunks > 0) prefetch(0);
  __syncthreads();  // sf is reused below

  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t slot = first_slot + c;
    const size_t base = ws_index(p, slot, hv, kC);
    const int buf = c & 1;
    if (c + 1 < num_chunks) prefetch(c + 1);
    const float e_last = __expf(p.ws.gamma[(static_cast<size_t>(slot) * p.num_v_heads + hv) * kC + kC - 1]);

    // S -> shared (fp32) -> bf16 operand and the workspace copy.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sm.sf + (warp * 32 + i * 16) * kLdTf + j * 16, S[i][j], kLdTf,
                                wmma::mem_row_major);
    if (c + 1 < num_chunks) cp_async_wait<1>();  // this chunk's group has landed
    else cp_async_wait<0>();
    __syncthreads();
    bf16* s_out = p.ws.s + ws_index(p, slot, hv, kD) + col0;
    for (int i = threadIdx.x; i < kD * (kVT / 8); i += kThreads) {
      const int r = i / (kVT / 8), c8 = (i % (kVT / 8)) * 8;
      alignas(16) bf16 h[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) h[j] = __float2bfloat16_rn(sm.sf[r * kLdTf + c8 + j]);
      *reinterpret_cast<uint4*>(sm.sb + r * kLdT + c8) = *reinterpret_cast<const uint4*>(h);
      *reinterpret_cast<uint4*>(s_out + r * kD + c8) = *reinterpret_cast<const uint4*>(h);
    }
    __syncthreads();

    // Vn = U - W S
    mma_tile<kC, kVT, kD, false, false, kThreads>(sm.vf, kLdTf, sm.w[buf], kLdD, sm.sb, kLdT,
                                                  false);
    __syncthreads();
    bf16* vn_out = p.ws.vn + base + col0;
    for (int i = threadIdx.x; i < kC * (kVT / 8); i += kThreads) {
      const int r = i / (kVT / 8), c8 = (i % (kVT / 8)) * 8;
      const bf16* uh = sm.u[buf] + r * kLdT + c8;
      alignas(16) bf16 h[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        h[j] = __float2bfloat16_rn(__bfloat162float(uh[j]) - sm.vf[r * kLdTf + c8 + j]);
      *reinterpret_cast<uint4*>(sm.vn + r * kLdT + c8) = *reinterpret_cast<const uint4*>(h);
      *reinterpret_cast<uint4*>(vn_out + r * kD + c8) = *reinterpret_cast<const uint4*>(h);
    }
    __syncthreads();

    // S = e_last S + KR^T Vn
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < S[i][j].num_elements; ++e) S[i][j].x[e] *= e_last;
#pragma unroll
        for (int k0 = 0; k0 < kC; k0 += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
          wmma::load_matrix_sync(a, sm.kr[buf] + k0 * kLdD + warp * 32 + i * 16, kLdD);
          wmma::load_matrix_sync(b, sm.vn + k0 * kLdT + j * 16, kLdT);
          wmma::mma_sync(S[i][j], a, b, S[i][j]);
        }
      }
    }
    __syncthreads();  // buffer buf is refilled by the next iteration's prefetch; sf, vn reused
  }

  if (p.final_state) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sm.sf + (warp * 32 + i * 16) * kLdTf + j * 16, S[i][j], kLdTf,
                                wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < kD * kVT; i += kThreads) {
      const int r = i / kVT, c = i % kVT;
      if (r < K && col0 + c < V)
        p.final_state[n * p.ht_s[0] + hv * p.ht_s[1] + r * p.ht_s[2] + (col0 + c) * p.ht_s[3]] =
            sm.sf[r * kLdTf + c];
    }
  }
}

}  // namespace

void launch_state(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(StateSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(
      state_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.num_seqs), p.num_v_heads,
                  (p.head_v_dim + kVT - 1) / kVT);
  state_kernel<<<grid, kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda::chunk
