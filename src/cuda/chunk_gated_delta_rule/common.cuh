// What the CUDA kernels of the chunked gated delta rule share: the problem (ChunkParams), where a
// chunk's rows live (sequences, varlen slots), the workspace layout, strided loads with dtype
// conversion, and the tile primitives (products of shared-memory tiles on the tensor cores).
//
// The algorithm is the CPU kernel's (src/cpu/chunk_gated_delta_rule.cpp, with the derivation);
// here it is split into two kernels by what parallelises (DESIGN.md, bench/NOTES.md):
//   intra  (slot, value head)             A, T = (I + A)^-1, W, U, M; K, Q   -> workspace
//   state  (sequence, value head, V tile) chunks in order, S in registers:
//                                         Vn = U - W S, O = Qe S + M Vn, S' = e_last S + KR^T Vn
//                                         (KR = diag(exp(gamma_last - gamma)) K, Qe = diag(e^gamma)
//                                         Q: the gates applied on the registers)
// The backward (launch.cu) replays both, keeping each chunk's incoming state (or takes what a
// training forward kept), then walks the chunks in reverse for dS (dstate.cu) and computes each
// chunk's gradients (grads.cu, a block per key head summing dq, dk over its value heads in
// registers, the l2norm backward fused).
// reduce.cu's per-value-head reduction serves the token-by-token op's backward.
// Chunks are C = 64 tokens. Head dimensions are padded to 128 in shared memory and in the
// workspace (K, V <= 128): padding rows/columns are zero and contribute nothing. A chunk shorter
// than 64 (a sequence's last) is padded with k = v = q = 0, g = 0, beta = 0 rows: its gamma stays
// flat past the end, so gamma[63] is the last real token's and every formula holds unchanged.
//
// Products take bf16 operands (q, k, v, W, U, S, Vn rounded to bf16, as FLA does) and
// accumulate in fp32 on the tensor cores (mma.sync on register fragments; the backward's
// per-chunk gradients, grads.cu, on Hopper's wgmma); the triangular inverse is fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/convert.cuh"
#include "cuda/cp_async.cuh"
#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda::chunk {

using bf16 = __nv_bfloat16;

constexpr int kC = 64;         // chunk length
constexpr int kD = 128;        // padded head dimension (K and V)
constexpr int kLdD = kD + 8;   // bf16 row stride of a [*, 128] tile in shared memory
constexpr int kLdC = kC + 8;   // bf16 row stride of a [*, 64] tile
constexpr int kLdDf = kD + 4;  // fp32 row stride of a [*, 128] tile
constexpr int kLdCf = kC + 4;  // fp32 row stride of a [*, 64] tile
constexpr float kL2NormEps = 1e-6f;

// Where element (r, c) of a bf16 shared-memory tile lies, for the loaders that serve tiles of
// either layout (load_tile, copy_tile_async): RowTile<kLd>, rows of stride kLd (padded: the
// forward's and the state passes' tiles, read by ldmatrix); SwzTile<kRows>, the 128-byte
// swizzled layout that wgmma reads (cuda/wgmma.cuh; grads.cu's tiles): 64-column boxes of kRows
// rows x 128 bytes, box b at b kRows 64 elements, the 16-byte chunk j of a row (its columns
// 8 j .. 8 j + 7) at chunk j ^ (r % 8). The swizzle also keeps ldmatrix, whole-chunk accesses
// and the accumulator layout's 4-byte column pairs (8 rows of one chunk) free of bank conflicts.
template <int kLd>
struct RowTile {
  __device__ __forceinline__ static int at(int r, int c) { return r * kLd + c; }
};
template <int kRows>
struct SwzTile {
  static_assert(kRows % 8 == 0, "whole 8-row swizzle groups");
  __device__ __forceinline__ static int at(int r, int c) {
    return (c >> 6) * (kRows * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
  }
};

// The l2norm backward of one K <= 128 row held by a warp (lane owns dims lane + 32 j): g, the
// gradient with respect to x / |x|, becomes the gradient with respect to x. Sums by butterfly
// shuffles (every lane gets the same totals).
__device__ __forceinline__ void l2norm_backward_row(const float (&x)[4], float (&g)[4]) {
  float ss = 0.f, xdot = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    ss += x[j] * x[j];
    xdot += x[j] * g[j];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    ss += __shfl_xor_sync(0xffffffffu, ss, off);
    xdot += __shfl_xor_sync(0xffffffffu, xdot, off);
  }
  const float inv = rsqrtf(ss + kL2NormEps), ydot = xdot * inv;
#pragma unroll
  for (int j = 0; j < 4; ++j) g[j] = inv * (g[j] - x[j] * inv * ydot);
}
constexpr float kMinLogDecay = -1e4f;  // g is floored here (exp underflows to 0 long before)

// Workspace tensors from phase 1, slot-major: [num_slots, HV, 64, 128] bf16 unless noted. K and
// Q are kept per key head, ungated: the state passes apply the gates in registers (state.cu,
// dstate.cu).
struct Workspace {
  bf16* w;       // W = T diag(b e) K
  bf16* u;       // U = T diag(b) V
  bf16* kn;      // K, normalised, per key head              [num_slots, H, 64, 128]
  bf16* qn;      // Q, normalised and scaled, per key head   [num_slots, H, 64, 128]
  bf16* m;       // M = Gamma * causal(Q K^T)                [num_slots, HV, 64, 64]
  float* gamma;  // within-chunk cumsum of g                 [num_slots, HV, 64]
  bf16* t;       // T = (I + A)^-1, where wanted (else null) [num_slots, HV, 64, 64]
  float* beta;   // beta (fp32, 0 past the chunk), with T    [num_slots, HV, 64]
  // 1 / |x| of K's and Q's rows before the l2norm, with T     [num_slots, H, 64]
  // (the backward's l2norm gradient; written only where use_qk_l2norm)
  float* k_inv;
  float* q_inv;
};

// What the backward adds (launch.cu, above backward(), has the whole picture). Chunk states are
// stored transposed, S^T [v][k], because the state kernels hold S^T in registers: a thread's two
// adjacent values are one 4-byte store.
struct BackwardParams {
  bf16* states;   // S^T entering each chunk                  [num_slots, HV, 128, 128]
  bf16* dstates;  // dS^T, the gradient of the state leaving each chunk (same layout)
  // per value head: dL/d(normalised q), dL/d(normalised k)  [B * T, HV, K]; used by the
  // token-by-token op's backward (reduce.cu), not by the chunked one
  float* dq_heads;
  float* dk_heads;
  const void* d_o;  // any float dtype
  DType d_o_dtype;
  int64_t d_o_s[4];
  const float* d_final_state;  // [N, HV, K, V] or nullptr (zero)
  float* d_initial_state;      // or nullptr (not wanted)
  int64_t dht_s[4], dh0_s[4];
  void *dq, *dk, *dv, *dg, *dbeta;
  DType dg_dtype, dbeta_dtype;
  int64_t dq_s[4], dk_s[4], dv_s[4], dg_s[3], dbeta_s[3];
};

struct ChunkParams {
  const void *q, *k, *v, *g, *beta;
  DType dtype, g_dtype, beta_dtype;
  int64_t q_s[4], k_s[4], v_s[4], g_s[3], beta_s[3];
  const void* cu_seqlens;  // nullptr: not varlen
  bool cu_seqlens_64;
  int64_t seq_len;         // T
  int64_t num_slots;
  int num_seqs, num_heads, num_v_heads, group, head_k_dim, head_v_dim;
  float scale;
  bool l2norm;
  Workspace ws;
  // forward
  const float* initial_state;  // [N, HV, K, V] or nullptr (zeros)
  float* final_state;          // or nullptr (not written)
  void* o;                     // or nullptr: the backward's replay writes no output
  int64_t h0_s[4], ht_s[4], o_s[4];
  // The forward's `saved` (training): S^T entering each chunk, as bwd.states, for the backward;
  // nullptr: not kept. (Phase 1's products are kept too: ws points into `saved` then.)
  bf16* saved_states;
  BackwardParams bwd;          // zero in the forward
};

// ---------------------------------------------------------------------------------- geometry

struct Seq {
  int64_t batch, begin, end;
};

__device__ __forceinline__ int64_t cu_offset(const ChunkParams& p, int64_t i) {
  return p.cu_seqlens_64 ? static_cast<const int64_t*>(p.cu_seqlens)[i]
                         : static_cast<const int32_t*>(p.cu_seqlens)[i];
}

__device__ __forceinline__ Seq sequence(const ChunkParams& p, int64_t n) {
  if (p.cu_seqlens) return {0, cu_offset(p, n), cu_offset(p, n + 1)};
  return {n, 0, p.seq_len};
}

// First slot of sequence n (the CPU backend's layout): floor(cu[n] / C) + n never overlaps.
__device__ __forceinline__ int64_t slot_begin(const ChunkParams& p, int64_t n) {
  if (p.cu_seqlens) return cu_offset(p, n) / kC + n;
  return n * ((p.seq_len + kC - 1) / kC);
}

struct ChunkRef {
  int64_t batch, t0;  // first row
  int len;            // rows in this chunk (1..64); 0: the slot holds no chunk
  int64_t n, c;       // sequence, chunk index within it
};

// The chunk stored in `slot`, found by a binary search over the sequences' first slots.
__device__ inline ChunkRef chunk_of_slot(const ChunkParams& p, int64_t slot) {
  int64_t n;
  if (p.cu_seqlens) {
    int64_t lo = 0, hi = p.num_seqs - 1;  // largest n with slot_begin(n) <= slot
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (slot_begin(p, mid) <= slot) lo = mid;
      else hi = mid - 1;
    }
    n = lo;
  } else {
    n = slot / ((p.seq_len + kC - 1) / kC);
  }
  const Seq s = sequence(p, n);
  const int64_t c = slot - slot_begin(p, n);
  const int64_t t0 = s.begin + c * kC;
  const int64_t left = s.end - t0;
  const int len = left <= 0 ? 0 : (left < kC ? static_cast<int>(left) : kC);
  return {s.batch, t0, len, n, c};
}

// Offset of (slot, hv)'s block of `elems` elements in a workspace tensor.
__device__ __forceinline__ size_t ws_index(const ChunkParams& p, int64_t slot, int hv,
                                           int elems) {
  return (static_cast<size_t>(slot) * p.num_v_heads + hv) * elems;
}

// ---------------------------------------------------------------------------------- loads

// Two floats as a bf16 pair (round to nearest even), low half first; and back.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float2 unpack_bf16(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}

// Loads rows [t0, t0 + len) of head h of a [B, T, H, D] tensor into a bf16 [64, 128] tile (Layout),
// zero past len and past D; optionally l2-normalises each row (fp32), multiplies it by `mul`.
// row_inv (shared memory, may be nullptr) receives each row's 1 / |x| when l2norm is set (what
// the l2norm's backward needs besides the tile: grads.cu, store_key_grad).
// A row is 8 lanes' work: lane j of the 8 holds columns 8 j .. 8 j + 7 and 64 + 8 j .. + 7, read
// as 16-byte accesses where the rows allow it (D = 128, unit stride, 16-byte aligned rows: the
// usual layout and projection views), else one by one; its |x|^2 takes three shuffles. Warp w
// owns rows 4 (w + i nwarps) .. + 3. All of a thread's loads are issued before any is used, so
// their latencies overlap; they are held raw until then. (The previous layout, a row per warp
// and 4 columns a lane, spent five dependent shuffles a row: ~35% of the intra kernel's stall
// samples sat in its two l2-normalised loads, H100 1 x 32768.)
template <typename T, int kThreads, typename Layout = RowTile<kLdD>>
__device__ void load_tile(const T* base, const int64_t* s, int64_t batch, int64_t t0, int len,
                          int h, int D, bool l2norm, float mul, float* row_inv, bf16* tile) {
  constexpr int kWarps = kThreads / 32, kPasses = kC / (4 * kWarps);
  static_assert(kPasses * 4 * kWarps == kC, "whole rows a warp");
  constexpr int kVecs = sizeof(T) / 2;                       // 16-byte pieces per 8 elements
  constexpr int kAlign = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, j = lane & 7;
  const T* src = base + batch * s[0] + t0 * s[1] + h * s[2];
  const bool vec = D == kD && s[3] == 1 && s[0] % kAlign == 0 && s[1] % kAlign == 0 &&
                   s[2] % kAlign == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  uint4 raw[kPasses][2][kVecs];  // 8 elements of T per [pass][half]
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int r = 4 * (warp + i * kWarps) + (lane >> 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = 64 * half + 8 * j;
      if (vec) {  // whole rows: no column bound
#pragma unroll
        for (int v = 0; v < kVecs; ++v)
          raw[i][half][v] = r < len ? *reinterpret_cast<const uint4*>(src + r * s[1] + c + 4 * v)
                                    : make_uint4(0u, 0u, 0u, 0u);
      } else {
        T* e = reinterpret_cast<T*>(raw[i][half]);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int d = c + k;
          e[k] = (r < len && d < D) ? src[r * s[1] + d * s[3]] : from_f32<T>(0.f);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int r = 4 * (warp + i * kWarps) + (lane >> 3);
    float x[16];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const T* e = reinterpret_cast<const T*>(raw[i][half]);
#pragma unroll
      for (int k = 0; k < 8; ++k) x[8 * half + k] = to_f32(e[k]);
    }
    float m = mul;
    if (l2norm) {
      float sq = 0.f;
#pragma unroll
      for (int k = 0; k < 16; ++k) sq = fmaf(x[k], x[k], sq);
#pragma unroll
      for (int off = 4; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
      const float inv = rsqrtf(sq + kL2NormEps);
      if (row_inv != nullptr && j == 0) row_inv[r] = inv;
      m *= inv;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint4 out;
      out.x = pack_bf16(x[8 * half] * m, x[8 * half + 1] * m);
      out.y = pack_bf16(x[8 * half + 2] * m, x[8 * half + 3] * m);
      out.z = pack_bf16(x[8 * half + 4] * m, x[8 * half + 5] * m);
      out.w = pack_bf16(x[8 * half + 6] * m, x[8 * half + 7] * m);
      *reinterpret_cast<uint4*>(tile + Layout::at(r, 64 * half + 8 * j)) = out;
    }
  }
}

// Starts copying a [kRows, kCols] bf16 block (row stride kLdSrc elements) into a tile of layout
// Dst (RowTile or SwzTile), 16 bytes a cp.async (cuda/cp_async.cuh); with kRowBound, rows >= valid_rows
// are zero-filled without being read. Commit and wait are the caller's. A thread copies one
// column group of rows r0, r0 + kThreads / (kCols / 8), ...: its addresses are one base plus
// constant offsets, a few instructions a copy. (A flat loop over the block's copies, i / per_row
// and i % per_row each time, spent most of the forward state pass's issue slots outside its
// products: ncu, H100 1 x 32768.)
template <int kThreads, int kRows, int kCols, int kLdSrc, typename Dst, bool kRowBound = false>
__device__ __forceinline__ void copy_tile_async(const bf16* src, bf16* tile,
                                                int valid_rows = kRows) {
  constexpr int kPerRow = kCols / 8, kRowsPerPass = kThreads / kPerRow;
  static_assert(kCols % 8 == 0 && kThreads % kPerRow == 0, "whole rows a pass");
  const int r0 = threadIdx.x / kPerRow, c = (threadIdx.x % kPerRow) * 8;
  const bf16* from = src + r0 * kLdSrc + c;
#pragma unroll
  for (int r = 0; r < kRows; r += kRowsPerPass) {
    if (kRows % kRowsPerPass != 0 && r0 + r >= kRows) continue;
    bf16* to = tile + Dst::at(r0 + r, c);
    if constexpr (kRowBound) {
      cp_async_16_or_zero(to, from + r * kLdSrc, r0 + r < valid_rows);
    } else {
      cp_async_16(to, from + r * kLdSrc);
    }
  }
}

// gamma (cumsum of g, floored), beta of one chunk, by the 32 lanes of one warp (rows 2 lane,
// 2 lane + 1), in two steps so that the loads' latency overlaps the caller's other loads: load()
// issues them, store() scans and writes to shared memory; zero past len.
struct ChunkGates {
  float g[2], b[2];

  __device__ __forceinline__ void load(const ChunkParams& p, const ChunkRef& ch, int hv) {
    const int lane = threadIdx.x & 31;
    const int64_t gb = ch.batch * p.g_s[0] + ch.t0 * p.g_s[1] + hv * p.g_s[2];
    const int64_t bb = ch.batch * p.beta_s[0] + ch.t0 * p.beta_s[1] + hv * p.beta_s[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = lane * 2 + j;
      g[j] = r < ch.len ? load_float(p.g, p.g_dtype, gb + r * p.g_s[1]) : 0.f;
      b[j] = r < ch.len ? load_float(p.beta, p.beta_dtype, bb + r * p.beta_s[1]) : 0.f;
    }
  }

  __device__ __forceinline__ void store(float* gamma, float* beta) {
    const int lane = threadIdx.x & 31;
    float x[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) x[j] = g[j] != g[j] ? g[j] : fmaxf(g[j], kMinLogDecay);  // NaN kept
    // inclusive scan over 64 values: pairs within a lane, then across lanes
    x[1] += x[0];
    float run = x[1];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, run, off);
      if (lane >= off) run += y;
    }
    const float before = run - x[1];
    gamma[lane * 2] = before + x[0];
    gamma[lane * 2 + 1] = run;
    beta[lane * 2] = b[0];
    beta[lane * 2 + 1] = b[1];
  }
};

// ---------------------------------------------------------------------------------- tiles

// T = (I + A)^-1 for strictly lower A (fp32 [64, kLdCf]), by 16 x 16 blocks, all threads of the
// block taking part (it contains __syncthreads: call it from every thread). Tf (fp32 [64, kLdCf])
// receives T, X (fp32, 768 floats) is scratch; T is also written as bf16 [64, kLdC].
//   diagonal blocks: D_b = (I + A_bb)^-1 by substitution down each column (64 threads, 16 steps)
//   below them, by distance d = i - j = 1, 2, 3:  T_ij = -D_i sum_{m=j}^{i-1} A_im T_mj
// The longest dependent chain is 16 + 3 x (48 + 16) multiply-adds, against 2016 for a plain
// substitution on one thread per column.
template <int kThreads>
__device__ inline void invert_unit_lower(const float* A, float* Tf, float* X, bf16* T) {
  const int tid = threadIdx.x;
  for (int i = tid; i < kC * kC; i += kThreads) Tf[(i / kC) * kLdCf + i % kC] = 0.f;
  __syncthreads();
  if (tid < kC) {
    const int b = tid / 16, j = tid % 16, o = b * 16;
    float t[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < i; ++m) acc = fmaf(A[(o + i) * kLdCf + o + m], t[m], acc);
      t[i] = i < j ? 0.f : (i == j ? 1.f : -acc);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) Tf[(o + i) * kLdCf + o + j] = t[i];
  }
  __syncthreads();
#pragma unroll
  for (int d = 1; d < 4; ++d) {
    const int blocks = 4 - d;  // (i, j) = (j + d, j), j = 0 .. blocks - 1
    for (int e = tid; e < blocks * 256; e += kThreads) {
      const int j = e / 256, r = (e / 16) % 16, c = e % 16, i = j + d;
      float acc = 0.f;
      for (int m = j; m < i; ++m)
#pragma unroll
        for (int q = 0; q < 16; ++q)
          acc = fmaf(A[(i * 16 + r) * kLdCf + m * 16 + q], Tf[(m * 16 + q) * kLdCf + j * 16 + c], acc);
      X[e] = acc;
    }
    __syncthreads();
    for (int e = tid; e < blocks * 256; e += kThreads) {
      const int j = e / 256, r = (e / 16) % 16, c = e % 16, i = j + d;
      float acc = 0.f;
#pragma unroll
      for (int q = 0; q < 16; ++q)
        acc = fmaf(Tf[(i * 16 + r) * kLdCf + i * 16 + q], X[j * 256 + q * 16 + c], acc);
      Tf[(i * 16 + r) * kLdCf + j * 16 + c] = -acc;
    }
    __syncthreads();
  }
  for (int i = tid; i < kC * kC; i += kThreads) {
    const int r = i / kC, c = i % kC;
    T[r * kLdC + c] = __float2bfloat16_rn(Tf[r * kLdCf + c]);
  }
}

// ---------------------------------------------------------------------------------- mma.sync
// Register-level m16n8k16 bf16 products (sm_80+) for the state pass, where the state stays in
// accumulator registers. Fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16x8:  c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
// The C fragments of two adjacent n8 tiles are, packed to bf16 pairs, the A fragment of one k16
// block: the product of one mma feeds the next without leaving registers.

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory; lane i gives the address of row i % 8 of matrix
// i / 8. .trans delivers each matrix transposed.
// By shared-memory address (tiles.cuh's SmemTile) or by pointer.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans_at(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  ldmatrix_x4_at(r, static_cast<uint32_t>(__cvta_generic_to_shared(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  ldmatrix_x4_trans_at(r, static_cast<uint32_t>(__cvta_generic_to_shared(p)));
}

// B fragments of n8 tiles n0 and n0 + 8 over k16 block k0, for B(k, n) = X[n][k] with X
// row-major in shared memory (stride ld): b[0], b[1] for tile n0; b[2], b[3] for tile n0 + 8.
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], const bf16* X, int ld, int n0,
                                            int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  uint32_t m[4];
  ldmatrix_x4(m, X + (n0 + (j >> 1) * 8 + r) * ld + k0 + (j & 1) * 8);
  b[0] = m[0], b[1] = m[1], b[2] = m[2], b[3] = m[3];
}

// The same for B(k, n) = X[k][n] (X row-major, k the row): transposed loads.
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], const bf16* X, int ld, int n0,
                                            int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  uint32_t m[4];
  ldmatrix_x4_trans(m, X + (k0 + (j & 1) * 8 + r) * ld + n0 + (j >> 1) * 8);
  b[0] = m[0], b[1] = m[1], b[2] = m[2], b[3] = m[3];
}

// The A fragment of the 16x16 block (m0, k0) of A(m, k) = X[k][m] (X row-major, stride ld: A is
// stored transposed): transposed loads of the four 8x8 blocks in the order a0..a3 wants them.
__device__ __forceinline__ void load_a_cols(uint32_t (&a)[4], const bf16* X, int ld, int m0,
                                            int k0) {
  const int lane = threadIdx.x & 31, j = lane >> 3, r = lane & 7;
  ldmatrix_x4_trans(a, X + (k0 + (j >> 1) * 8 + r) * ld + m0 + (j & 1) * 8);
}

}  // namespace flashdelta::detail::cuda::chunk
