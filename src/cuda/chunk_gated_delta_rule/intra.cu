// Chunked gated delta rule, CUDA, phase 1 of 2: everything inside one chunk that does not need
// the state (see common.cuh for the whole picture).
//
// One block per (slot, value head), 128 threads (4 warps); warp w owns the chunk's rows
// 16 w .. 16 w + 15 in every product. q and k are loaded and normalised (fp32 norms, bf16 rows,
// q scaled), v arrives by cp.async meanwhile, and the gates are read once:
//   gamma = cumsum(g) (fp32), beta, be = beta e^gamma
//   K K^T, Q K^T                                                mma.sync, in accumulator registers
//   A  = strictLower(b_i exp(gamma_i - gamma_j) (K K^T)_ij)    on the accumulator registers
//   M  = Gamma * causal(Q K^T)                                  likewise; stored bf16
//   T  = (I + A)^-1                                             fp32, by 2 x 2 block recursion,
//                                                               in A's place
//   W  = (T diag(be)) K,  U = (T diag(b)) V                     the row scalings of K and V are
//                                                               column scalings of T, applied
//                                                               while T's rows become A fragments
// Products take bf16 operands and accumulate in fp32; results are packed to bf16 from the
// accumulators and leave through a warp-private staging tile as 16-byte stores. Only the lower
// triangle is computed: warp w needs columns < 16 (w + 1) of K K^T, Q K^T and T.
// Writes W, U, M (bf16), gamma (fp32) and, where p.ws.t is set (the backward, or a training
// forward that keeps it for the backward), T (bf16) and beta (fp32, for the backward's gradient
// kernel to copy a head ahead), in the layouts of common.cuh's Workspace;
// and the normalised K and Q of each (slot, key head) ([num_slots, H, 64, 128], ws_key_index),
// written by the key head's first value head: the state passes scale by the gates in registers
// (with T, for the backward's gradient kernel, also their rows' inverse norms).
//
// Why a block per value head (v4; v3 had one per key head looping over its value heads): the
// kernel is latency-bound (the inverse's dependent chains, the loads, the barriers), not
// tensor-bound (about 640 mma per block). v3 needed 255 registers (K K^T and Q K^T held across
// the loop) and 107 KB of shared memory: 2 blocks, 8 warps per SM, 12% occupancy. Here the value
// heads of a key head run in parallel blocks, each recomputing K K^T and Q K^T (320 mma, cheap)
// from q and k that the neighbouring block has just pulled into L2 (blocks are numbered value
// head fastest); the accumulators die before W and U, q's tile is reused for A once Q K^T is
// done (the same 272-byte rows), the inverse turns A into T in place, and v needs one buffer:
// 56 KB and 128 registers, so 4 blocks (16 warps) fit on an SM of sm_90 (with T in a tile of
// its own, 73 KB: 3 blocks).
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/chunk_gated_delta_rule/mma_frag.cuh"

namespace flashdelta::detail::cuda::chunk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
struct IntraSmem {
  bf16 kn[kC * kLdD];  // normalised k
  // Normalised, scaled q until Q K^T (and Q's copy to the workspace) is done; then the gated A
  // for the inverse (fp32), which turns it into T in place (its blocks above the diagonal are
  // never written); then, once each warp holds its rows of T as fragments, the warps' staging
  // tiles, warp w's over its own rows. Row r of A occupies exactly the bytes of row r of q
  // (kLdD bf16 = kLdCf fp32 = 272 bytes), and warp w's staging tile those of its rows.
  alignas(16) unsigned char qa[kC * kLdCf * sizeof(float)];
  bf16 v[kC * kLdD];
  float x[kWarps * 256];  // the inverse's scratch; before it, each warp's M staging (1 KB)
  float gamma[kC], beta[kC];
  float k_inv[kC], q_inv[kC];  // 1 / |x| of k's and q's rows (l2norm), for the backward
};
static_assert(kLdD * sizeof(bf16) == kLdCf * sizeof(float) &&
                  kC * kLdD * sizeof(bf16) == sizeof(IntraSmem::qa),
              "q's rows and A's rows share bytes");
static_assert(16 * kLdD * sizeof(bf16) == 16 * kLdCf * sizeof(float),
              "a warp's staging tile covers its own rows of T");
// 57,344 bytes: four blocks (16 warps) an SM on sm_90, where the previous layout (T in a tile of
// its own) allowed three.
static_assert(4 * (sizeof(IntraSmem) + 1024) <= 228 * 1024, "four blocks per SM on sm_90");
// bf16 v whose rows are 16-byte runs (the usual [B, T, HV, 128] layout, or a view with such
// strides) is copied by cp.async: no registers, so the next value head's v is in flight while
// this one is computed. Rows past the chunk's end are zero-filled with plain stores.
template <typename T>
__device__ __forceinline__ bool v_is_async(const ChunkParams& p) {
  if constexpr (!std::is_same_v<T, bf16>) {
    return false;
  } else {
    return p.head_v_dim == kD && p.v_s[3] == 1 && p.v_s[0] % 8 == 0 && p.v_s[1] % 8 == 0 &&
           p.v_s[2] % 8 == 0 && reinterpret_cast<uintptr_t>(p.v) % 16 == 0;
  }
}

// Starts copying value head hv's v rows of the chunk into `tile` (bf16 [64, kLdD]); commit is
// the caller's. Rows >= len are zeroed.
__device__ __forceinline__ void load_v_async(const ChunkParams& p, const ChunkRef& ch, int hv,
                                             bf16* tile) {
  const bf16* src = static_cast<const bf16*>(p.v) + ch.batch * p.v_s[0] + ch.t0 * p.v_s[1] +
                    hv * p.v_s[2];
  for (int i = threadIdx.x; i < kC * (kD / 8); i += kThreads) {
    const int r = i / (kD / 8), c = (i % (kD / 8)) * 8;
    if (r < ch.len) cp_async_16(tile + r * kLdD + c, src + r * p.v_s[1] + c);
    else *reinterpret_cast<uint4*>(tile + r * kLdD + c) = make_uint4(0u, 0u, 0u, 0u);
  }
}

static_assert(offsetof(IntraSmem, qa) % 16 == 0 && offsetof(IntraSmem, x) % 16 == 0 &&
                  offsetof(IntraSmem, v) % 16 == 0,
              "16-byte accesses");

// out[c] = sum_{q < len} l_row[q] r[q][c], c < kN: one row of a product of fp32 blocks in shared
// memory (r: kN columns of a block, row stride ldr; len a multiple of 16), one FMA chain per
// output in order of q. Per step one load of l_row (lanes of a row share it) and kN / 4 16-byte
// loads of r (lanes with the same columns share them).
template <int kN>
__device__ __forceinline__ void row_times_block(const float* l_row, const float* r, int ldr,
                                                int len, float (&out)[kN]) {
#pragma unroll
  for (int c = 0; c < kN; ++c) out[c] = 0.f;
  for (int q0 = 0; q0 < len; q0 += 16) {
#pragma unroll
    for (int qq = 0; qq < 16; ++qq) {
      const int q = q0 + qq;
      const float a = l_row[q];
#pragma unroll
      for (int c4 = 0; c4 < kN / 4; ++c4) {
        const float4 t = *reinterpret_cast<const float4*>(r + q * ldr + 4 * c4);
        out[4 * c4] = fmaf(a, t.x, out[4 * c4]), out[4 * c4 + 1] = fmaf(a, t.y, out[4 * c4 + 1]);
        out[4 * c4 + 2] = fmaf(a, t.z, out[4 * c4 + 2]);
        out[4 * c4 + 3] = fmaf(a, t.w, out[4 * c4 + 3]);
      }
    }
  }
}

template <int kN>
__device__ __forceinline__ void store_negated(float* dst, const float (&x)[kN]) {
#pragma unroll
  for (int c4 = 0; c4 < kN / 4; ++c4)
    *reinterpret_cast<float4*>(dst + 4 * c4) =
        make_float4(-x[4 * c4], -x[4 * c4 + 1], -x[4 * c4 + 2], -x[4 * c4 + 3]);
}

// T = (I + A)^-1 for strictly lower A, in place (fp32 [64, kLdCf], A complete below the
// diagonal: T's 16 x 16 blocks on and below the diagonal replace it), by 2 x 2 block recursion
// (T = [[T1, 0], [-T2 A21 T1, T2]] for halves T1, T2). Every thread of the block calls it (it
// synchronises the block, first so that A's writes are visible); X is the block's 4 KB of scratch.
//   1. D_i = (I + A_ii)^-1, i < 4: substitution down each column (64 threads, 16 steps; a
//      block's 16 columns are half a warp, which has read A_ii before any of them is written)
//   2. the 32-row halves: T_(i+1)i = -D_(i+1) (A_(i+1)i D_i), i = 0, 2 (warps i and i + 1, 8
//      columns each: a lane one row and 4 columns; the product in between in the warp's
//      scratch, and a block barrier before T_(i+1)i overwrites the A both warps read)
//   3. Y = A21 T1 ([32 x 32], T1 lower: block column c sums from row block c): warp w, block
//      (w / 2, w % 2), a lane one row and 8 columns; Y in the scratch
//   4. T21 = -T2 Y (T2 lower: block row r sums up to block r), the same blocks, over A21
// Longest chain 16 + 2 x 16 + 2 x 32 inner steps (the previous column-by-column rounds: 16 +
// 144, with one warp of four busy in the last), every warp busy in 2 to 4.
__device__ void invert_unit_lower_in_place(float* A, float* X) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  __syncthreads();  // A complete
  if (tid < kC) {
    const int o = (tid / 16) * 16, j = tid % 16;
    float t[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < i; ++m) acc = fmaf(A[(o + i) * kLdCf + o + m], t[m], acc);
      t[i] = i < j ? 0.f : (i == j ? 1.f : -acc);
    }
    __syncwarp(0xffffffffu);  // the block's A_ii read by all its columns
#pragma unroll
    for (int i = 0; i < 16; ++i) A[(o + i) * kLdCf + o + j] = t[i];
  }
  __syncthreads();
  {  // 2.
    const int i = 2 * (warp >> 1), r = lane & 15, cx = 4 * (lane >> 4), c = 8 * (warp & 1) + cx;
    const int row = 16 * (i + 1) + r;
    float* x = X + warp * 256;  // [16][8]
    float acc[4];
    row_times_block(A + row * kLdCf + 16 * i, A + 16 * i * kLdCf + 16 * i + c, kLdCf, 16, acc);
    *reinterpret_cast<float4*>(x + r * 8 + cx) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();  // both warps of the block are done with A_(i+1)i
    row_times_block(A + row * kLdCf + 16 * (i + 1), x + cx, 8, 16, acc);
    store_negated(A + row * kLdCf + 16 * i + c, acc);
  }
  __syncthreads();
  const int rb = warp >> 1, cb = warp & 1, r = lane >> 1, c = 16 * cb + 8 * (lane & 1);
  const int row = 32 + 16 * rb + r;
  float acc[8];
  // 3.
  row_times_block(A + row * kLdCf + 16 * cb, A + 16 * cb * kLdCf + c, kLdCf, 32 - 16 * cb, acc);
  float* y = X + (16 * rb + r) * 32 + c;  // [32][32]
  *reinterpret_cast<float4*>(y) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  *reinterpret_cast<float4*>(y + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
  __syncthreads();
  // 4.
  row_times_block(A + row * kLdCf + 32, X + c, 32, 16 * (rb + 1), acc);
  store_negated(A + row * kLdCf + c, acc);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 4) intra_kernel(const ChunkParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  IntraSmem& sm = *reinterpret_cast<IntraSmem*>(smem_raw);
  // Value head fastest: the blocks of one key head's value heads are neighbours (q, k from L2).
  const int64_t slot = blockIdx.x / p.num_v_heads;
  const int hv = static_cast<int>(blockIdx.x % p.num_v_heads);
  const int hk = hv / p.group;
  const ChunkRef ch = chunk_of_slot(p, slot);
  if (ch.len == 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int r0 = warp * 16;                  // this warp's rows
  const int rows[2] = {r0 + g, r0 + g + 8};  // this thread's rows of every C fragment
  bf16* const qn = reinterpret_cast<bf16*>(sm.qa);
  float* const a_tile = reinterpret_cast<float*>(sm.qa);

  // The gates' loads first (warp 0): in flight with the tiles' (scanned after them, this warp
  // would add a second load latency to the block's first barrier: 9% of this kernel's stall
  // samples, H100 1 x 32768).
  ChunkGates gates;
  if (warp == 0) gates.load(p, ch, hv);
  const bool v_async = v_is_async<T>(p);
  if (v_async) {  // v is in flight while q and k are loaded and multiplied
    load_v_async(p, ch, hv, sm.v);
    cp_async_commit();
  }
  // q, k (and v where it is not copied asynchronously): one 8-byte load per row and lane for the
  // usual layout (common.cuh's load_tile)
  load_tile<T, kThreads>(static_cast<const T*>(p.k), p.k_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, 1.f, sm.k_inv, sm.kn);
  load_tile<T, kThreads>(static_cast<const T*>(p.q), p.q_s, ch.batch, ch.t0, ch.len, hk,
                         p.head_k_dim, p.l2norm, p.scale, sm.q_inv, qn);
  if (!v_async)
    load_tile<T, kThreads>(static_cast<const T*>(p.v), p.v_s, ch.batch, ch.t0, ch.len, hv,
                           p.head_v_dim, false, 1.f, nullptr, sm.v);
  if (warp == 0) gates.store(sm.gamma, sm.beta);
  __syncthreads();  // k, q, gates (and the converted v)

  // K K^T and Q K^T, rows r0 .. r0 + 15, n8 tiles up to the diagonal block (2 warp + 1);
  // the tiles above stay zero.
  float kk[8][4] = {}, qk[8][4] = {};
#pragma unroll
  for (int kc = 0; kc < kD / 16; ++kc) {
    uint32_t ak[4], aq[4];
    load_a_rows(ak, sm.kn, kLdD, r0, kc * 16);
    load_a_rows(aq, qn, kLdD, r0, kc * 16);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (np > warp) continue;
      uint32_t b[4];
      load_b_rows(b, sm.kn, kLdD, np * 16, kc * 16);
      mma_bf16(kk[2 * np], ak, b[0], b[1]);
      mma_bf16(kk[2 * np + 1], ak, b[2], b[3]);
      mma_bf16(qk[2 * np], aq, b[0], b[1]);
      mma_bf16(qk[2 * np + 1], aq, b[2], b[3]);
    }
  }

  // K and Q once per key head (written by the key head's first value head); the state passes
  // (state.cu, dstate.cu) apply the gates themselves, the backward's gradient kernel takes them
  // with their rows' inverse norms. Each warp reads its own rows of q here, before its A
  // overwrites them.
  const size_t base = ws_index(p, slot, hv, kC * kD);
  if (hv % p.group == 0) {
    const size_t key_base = ws_key_index(p, slot, hk, kC * kD);
    if (p.ws.k_inv != nullptr && p.l2norm) {
      const size_t at = ws_key_index(p, slot, hk, kC) + (threadIdx.x & (kC - 1));
      if (threadIdx.x < kC) p.ws.k_inv[at] = sm.k_inv[threadIdx.x];
      else p.ws.q_inv[at] = sm.q_inv[threadIdx.x - kC];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int e = j * 32 + lane, r = r0 + (e >> 4), c = (e & 15) * 8;
      *reinterpret_cast<uint4*>(p.ws.kn + key_base + r * kD + c) =
          *reinterpret_cast<const uint4*>(sm.kn + r * kLdD + c);
      *reinterpret_cast<uint4*>(p.ws.qn + key_base + r * kD + c) =
          *reinterpret_cast<const uint4*>(qn + r * kLdD + c);
    }
  }
  // The warp's lanes have read their rows of q (ldmatrix, the copies above): A may overwrite
  // them. No other warp touches these rows until the inverse's first barrier.
  __syncwarp();

  // A (fp32, to shared memory for the inverse) and M (bf16, to the workspace) from the
  // accumulators. M is written whole, zeros above the diagonal: each warp stages its 16 rows,
  // half of the columns at a time, in its 1 KB of the inverse's scratch (free until the
  // inverse) and stores them as 16-byte pieces (from the accumulators, 8 rows of 4 bytes an
  // instruction, such stores cost the gradient kernel ~230 us for 2 x 134 MB: bench/NOTES.md,
  // session 15). The staging is [16][32] bf16 with 16-byte chunk j of row r at j ^ (r % 4): the
  // 4-byte writes meet at most in pairs.
  {
    bf16* const m_stage = reinterpret_cast<bf16*>(sm.x + warp * 256);
    auto staged = [&](int r, int c) {
      return m_stage + r * 32 + ((((c >> 3) ^ r) & 3) << 3) + (c & 7);
    };
    bf16* const m_out = p.ws.m + ws_index(p, slot, hv, kC * kC) + r0 * kC;
    const float gr[2] = {sm.gamma[rows[0]], sm.gamma[rows[1]]};
    const float br[2] = {sm.beta[rows[0]], sm.beta[rows[1]]};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int n4 = 0; n4 < 4; ++n4) {
        const int nt = 4 * half + n4, c = nt * 8 + 2 * t4, cs = n4 * 8 + 2 * t4;
        if (nt < 2 * warp + 2) {
          const float gc[2] = {sm.gamma[c], sm.gamma[c + 1]};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = rows[h];
            float av[2], mv[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float decay = __expf(gr[h] - gc[j]);
              av[j] = c + j < r ? br[h] * decay * kk[nt][2 * h + j] : 0.f;
              mv[j] = c + j <= r ? decay * qk[nt][2 * h + j] : 0.f;
            }
            *reinterpret_cast<float2*>(a_tile + r * kLdCf + c) = make_float2(av[0], av[1]);
            *reinterpret_cast<uint32_t*>(staged(r - r0, cs)) = pack_bf16(mv[0], mv[1]);
          }
        } else {
          *reinterpret_cast<uint32_t*>(staged(g, cs)) = 0u;
          *reinterpret_cast<uint32_t*>(staged(g + 8, cs)) = 0u;
        }
      }
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // 16 rows x 4 pieces
        const int e = j * 32 + lane, r = e >> 2, cs = (e & 3) * 8;
        *reinterpret_cast<uint4*>(m_out + r * kC + 32 * half + cs) =
            *reinterpret_cast<const uint4*>(staged(r, cs));
      }
      __syncwarp();  // the staging is rewritten by the next half
    }
  }

  if (v_async) cp_async_wait<0>();  // this thread's part of v; the inverse's barrier the rest
  // T = (I + A)^-1, in A's place.
  invert_unit_lower_in_place(a_tile, sm.x);

  // From here each warp reads only its own rows of T: the backward's copy (bf16, as the products
  // take it; zero above the diagonal), then the A fragments of W = (T diag(be)) K and
  // U = (T diag(b)) V (T's rows scaled per column into bf16; only k16 blocks up to the diagonal
  // are non-zero, be = b e^gamma). Then its rows become its staging tile.
  if (p.ws.t) {
    bf16* t_out = p.ws.t + ws_index(p, slot, hv, kC * kC);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // 16 rows x 8 pieces
      const int e = j * 32 + lane, r = r0 + (e >> 3), c = (e & 7) * 8;
      const bool zero = (c >> 4) > warp;  // a block above the diagonal: never written
      const float4 f0 = *reinterpret_cast<const float4*>(a_tile + r * kLdCf + c);
      const float4 f1 = *reinterpret_cast<const float4*>(a_tile + r * kLdCf + c + 4);
      uint4 h;
      h.x = zero ? 0u : pack_bf16(f0.x, f0.y);
      h.y = zero ? 0u : pack_bf16(f0.z, f0.w);
      h.z = zero ? 0u : pack_bf16(f1.x, f1.y);
      h.w = zero ? 0u : pack_bf16(f1.z, f1.w);
      *reinterpret_cast<uint4*>(t_out + r * kC + c) = h;
    }
  }
  uint32_t ta[2][4][4];  // [W, U][k16 block]
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
#pragma unroll
    for (int e = 0; e < 4; ++e) ta[0][kc][e] = ta[1][kc][e] = 0u;
    if (kc > warp) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // columns 2 t4 (a0, a1), 2 t4 + 8 (a2, a3)
      const int c = kc * 16 + 8 * h + 2 * t4;
      const float b0 = sm.beta[c], b1 = sm.beta[c + 1];
      const float be0 = b0 * __expf(sm.gamma[c]), be1 = b1 * __expf(sm.gamma[c + 1]);
      const float2 lo = *reinterpret_cast<const float2*>(a_tile + rows[0] * kLdCf + c);
      const float2 hi = *reinterpret_cast<const float2*>(a_tile + rows[1] * kLdCf + c);
      ta[0][kc][2 * h] = pack_bf16(lo.x * be0, lo.y * be1);
      ta[0][kc][2 * h + 1] = pack_bf16(hi.x * be0, hi.y * be1);
      ta[1][kc][2 * h] = pack_bf16(lo.x * b0, lo.y * b1);
      ta[1][kc][2 * h + 1] = pack_bf16(hi.x * b0, hi.y * b1);
    }
  }
  __syncwarp();  // the warp's rows of T are read: they become its staging tile
  bf16* stage = reinterpret_cast<bf16*>(sm.qa) + warp * 16 * kLdD;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const bf16* operand = which == 0 ? sm.kn : sm.v;
    float acc[16][4] = {};
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
      if (kc > warp) continue;
#pragma unroll
      for (int np = 0; np < 8; ++np) {
        uint32_t b[4];
        load_b_cols(b, operand, kLdD, np * 16, kc * 16);
        mma_bf16(acc[2 * np], ta[which][kc], b[0], b[1]);
        mma_bf16(acc[2 * np + 1], ta[which][kc], b[2], b[3]);
      }
    }
    store_rows16x128(acc, stage, (which == 0 ? p.ws.w : p.ws.u) + base + r0 * kD);
  }
  if (threadIdx.x < kC) {
    p.ws.gamma[ws_index(p, slot, hv, kC) + threadIdx.x] = sm.gamma[threadIdx.x];
    if (p.ws.beta) p.ws.beta[ws_index(p, slot, hv, kC) + threadIdx.x] = sm.beta[threadIdx.x];
  }
}

template <typename T>
void launch(const ChunkParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(IntraSmem);
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(intra_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
  // Three blocks per SM need all of the unified L1 as shared memory: ask for it, rather than
  // leave the split to the driver's heuristic.
  FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(intra_kernel<T>,
                                             cudaFuncAttributePreferredSharedMemoryCarveout,
                                             cudaSharedmemCarveoutMaxShared));
  const int64_t blocks = p.num_slots * p.num_v_heads;
  check_value(blocks <= 0x7fffffff, "chunk_gated_delta_rule: too many chunks x value heads");
  intra_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void launch_intra(const ChunkParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    default: launch<bf16>(p, stream); break;
  }
}

}  // namespace flashdelta::detail::cuda::chunk
