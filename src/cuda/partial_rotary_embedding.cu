// partial_rotary_embedding on the GPU (include/flashdelta/partial_rotary_embedding.h).
//
// The rows are the (b, t, head) triples of q followed by those of k: B * T * (H + HK) rows of
// head_dim channels, split into 16-byte vectors of N channels. Vector i < h / N (h = rotary_dim
// / 2) is rotated together with vector i + h / N (the rotation mixes exactly channels j and
// j + h), the vectors from rotary_dim on are copied. The backward is the same kernel applying the
// transposed rotation (sin_lo, sin_hi) -> (-sin_hi, -sin_lo), which also reproduces the rounding
// of transformers' autograd. Products and sums are rounded to the storage type as transformers'
// composition does.
//
// The row kernel (vectors per row V a power of two dividing the block, and a row's rotated
// vectors within one warp: the model's head_dim 256, rotary_dim 64 in bf16 is V = 32, one warp
// per row): thread (slot, i) of a 256-thread block owns vector i of kRowsPerThread rows, the
// block kRowsPerThread * 256 / V consecutive rows (3 * 8 = 24 in the model's case). A thread
// issues all its loads (x; cos, sin for the rotated vectors) before any math: 48 bytes of q / k
// in flight per thread, 48 KB per SM at 4 blocks (64 registers, no spill), against the ~25 KB
// that the copy bandwidth needs at ~1 us latency (the grid-strided kernel this replaces had one
// 16-byte load in flight per thread, warps split between rotated and copied items, and ran at
// 2.2 TB/s). The partner vector (and in the backward the partner's sin) comes from the partner
// lane by shuffle: q and k are read exactly once, every access is 16 bytes and a warp's accesses
// cover whole 128-byte lines in either layout (heads_first outputs included: a row is contiguous
// in both). cos / sin are read once per row but belong to the token (shared by its H + HK rows,
// consecutive in a block), so they come from L1 / L2. Moved per direction: q, k in and out
// (the floor). The 16-bit products are paired multiplies (HMUL2.BF16_V2 / HMUL2), the sums fp32
// then rounded: ~190 warp instructions per 512-byte row (SASS, sm_90a, bf16), ~60% of the issue
// rate at 3 TB/s, before the row's two index divisions became multiplies by host-computed
// inverses (~20 instructions fewer).
//
// The generic kernel (any head_dim, rotary_dim, strides): one work item per thread, grid-
// strided: a 16-byte vector of the rotated half-pair (channels [i, i + N) with [i + h, i + h +
// N)) or of the pass-through channels; N = 1 when h, head_dim - rotary_dim or an outer stride is
// not a multiple of N or a pointer is not 16-byte aligned.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/check.h"
#include "core/fused_ops_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 3;  // the row kernel: rows per thread, all loaded before the math

struct Strides4 {
  int64_t b, t, h;  // the last dimension has unit stride
};

struct RotaryParams {
  const void *q, *k, *cos, *sin;
  void *q_out, *k_out;
  Strides4 q_s, k_s, q_out_s, k_out_s;
  int64_t cos_b, cos_t, sin_b, sin_t;
  int64_t seq_len, num_q_heads, num_k_heads, head_dim, rotary_dim;
  int64_t rows;  // B * T * (H + HK)
  bool transpose;
  int row_vectors_log2;  // the row kernel: log2(head_dim / N)
  // The row kernel with 32-bit indices (rows < 2^31): row / (H + HK) and token / T as a
  // multiply-high, an add and a shift (Granlund and Montgomery's division by an invariant).
  uint32_t heads_magic, seq_len_magic;
  int heads_shift, seq_len_shift;
};

// q = floor(n / d) = (umulhi(n, magic) + n) >> shift for n < 2^31, with shift = ceil(log2 d) and
// magic = floor(2^32 (2^shift - d) / d) + 1 (< 2^32 for d < 2^31).
void division_magic(int64_t d, uint32_t& magic, int& shift) {
  shift = 0;
  while ((int64_t{1} << shift) < d) ++shift;
  magic = static_cast<uint32_t>(
      ((static_cast<unsigned __int128>(1) << 32) * ((int64_t{1} << shift) - d)) / d + 1);
}

template <typename Index>
__device__ __forceinline__ Index divide(Index n, Index d, uint32_t magic, int shift) {
  if constexpr (std::is_same_v<Index, uint32_t>) {
    return (__umulhi(n, magic) + n) >> shift;  // n < 2^31: the sum does not wrap
  } else {
    return n / d;
  }
}

// Index: uint32_t when the work count allows (three 64-bit divisions per vector would cost more
// than its memory traffic), else int64_t. Offsets are 64-bit either way.
template <typename T, int N, typename Index>
__global__ void __launch_bounds__(kThreads) rotary_generic_kernel(const RotaryParams p) {
  const int64_t half = p.rotary_dim / 2;
  const Index rot_items = static_cast<Index>(half / N);
  const Index items = rot_items + static_cast<Index>((p.head_dim - p.rotary_dim) / N);
  const Index heads = static_cast<Index>(p.num_q_heads + p.num_k_heads);
  const Index seq_len = static_cast<Index>(p.seq_len);
  const Index total = static_cast<Index>(p.rows) * items;
  for (Index i = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<Index>(gridDim.x) * kThreads) {
    const Index row = i / items;
    const Index item = i - row * items;
    const Index head = row % heads;
    const Index token = row / heads;
    const int64_t b = token / seq_len, t = token - static_cast<Index>(b) * seq_len;
    const bool is_q = head < static_cast<Index>(p.num_q_heads);
    const int64_t h = is_q ? static_cast<int64_t>(head)
                           : static_cast<int64_t>(head) - p.num_q_heads;
    const Strides4& xs = is_q ? p.q_s : p.k_s;
    const Strides4& ys = is_q ? p.q_out_s : p.k_out_s;
    const T* x = static_cast<const T*>(is_q ? p.q : p.k) + b * xs.b + t * xs.t + h * xs.h;
    T* y = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * ys.b + t * ys.t + h * ys.h;
    if (item >= rot_items) {  // pass-through channels
      const int64_t c = p.rotary_dim + static_cast<int64_t>(item - rot_items) * N;
      *reinterpret_cast<Pack<T, N>*>(y + c) = *reinterpret_cast<const Pack<T, N>*>(x + c);
      continue;
    }
    const int64_t c = static_cast<int64_t>(item) * N;
    const T* cos = static_cast<const T*>(p.cos) + b * p.cos_b + t * p.cos_t;
    const T* sin = static_cast<const T*>(p.sin) + b * p.sin_b + t * p.sin_t;
    float lo[N], hi[N], c_lo[N], c_hi[N], s_lo[N], s_hi[N], y_lo[N], y_hi[N];
    load_pack<T, N>(x + c, lo);
    load_pack<T, N>(x + c + half, hi);
    load_pack<T, N>(cos + c, c_lo);
    load_pack<T, N>(cos + c + half, c_hi);
    load_pack<T, N>(sin + c, s_lo);
    load_pack<T, N>(sin + c + half, s_hi);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float sl = p.transpose ? -s_hi[k] : s_lo[k];
      const float sh = p.transpose ? -s_lo[k] : s_hi[k];
      y_lo[k] = add_rn(round_to<T>(mul_rn(lo[k], c_lo[k])), round_to<T>(mul_rn(-hi[k], sl)));
      y_hi[k] = add_rn(round_to<T>(mul_rn(hi[k], c_hi[k])), round_to<T>(mul_rn(lo[k], sh)));
    }
    store_pack<T, N>(y + c, y_lo);
    store_pack<T, N>(y + c + half, y_hi);
  }
}

// 16 bytes of T as 32-bit words: loaded read-only, shuffled between lanes.
template <typename T>
__device__ __forceinline__ uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Element k of 16 bytes of T, in fp32 (k a compile-time constant after unrolling): shifts and
// masks of the 32-bit words, so the packs stay in registers (a T[8] view of them would not).
__device__ __forceinline__ uint32_t word_of(const uint4& r, int w) {
  return w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
}

template <typename T>
__device__ __forceinline__ float element_of(const uint4& r, int k) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word_of(r, k));
  } else {
    const uint32_t word = word_of(r, k / 2);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16: the top half of an fp32
      return __uint_as_float(k % 2 ? word & 0xffff0000u : word << 16);
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(k % 2 ? word >> 16 : word)));
    }
  }
}

// kVec<T> fp32 values rounded to T (to nearest even), as 16 bytes.
template <typename T>
__device__ __forceinline__ uint4 pack_of(const float (&v)[kVec<T>]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(v[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 two = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &two, 4);
    } else {
      const __half2 two = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &two, 4);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Two 16-bit products at once, each rounded to T (to nearest even), as 32-bit words.
template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
  T2 a2, b2;
  memcpy(&a2, &a, 4);
  memcpy(&b2, &b, 4);
  const T2 p = __hmul2(a2, b2);
  uint32_t r;
  memcpy(&r, &p, 4);
  return r;
}

// Two fp32 values rounded to T (to nearest even), as a 32-bit word (low half: lo).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 two = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &two, 4);
  } else {
    const __half2 two = __floats2half2_rn(lo, hi);
    memcpy(&r, &two, 4);
  }
  return r;
}

__device__ __forceinline__ uint4 shfl16(const uint4& r, int lane) {
  return make_uint4(__shfl_sync(0xffffffffu, r.x, lane), __shfl_sync(0xffffffffu, r.y, lane),
                    __shfl_sync(0xffffffffu, r.z, lane), __shfl_sync(0xffffffffu, r.w, lane));
}

// Where row `row` of q (rows of a token: q's H heads, then k's HK) or of its output starts.
template <typename T>
struct RowAddress {
  const T* x;
  T* y;
  int64_t cos_sin;  // offset of the token's cos / sin
};

template <typename T, typename Index>
__device__ __forceinline__ RowAddress<T> row_address(const RotaryParams& p, Index row, Index heads,
                                                     Index seq_len) {
  const Index token = divide<Index>(row, heads, p.heads_magic, p.heads_shift);
  const Index head = row - token * heads;
  const Index b = divide<Index>(token, seq_len, p.seq_len_magic, p.seq_len_shift);
  const Index t = token - b * seq_len;
  const bool is_q = head < static_cast<Index>(p.num_q_heads);
  const int64_t h = is_q ? static_cast<int64_t>(head)
                         : static_cast<int64_t>(head) - p.num_q_heads;
  const Strides4& xs = is_q ? p.q_s : p.k_s;
  const Strides4& ys = is_q ? p.q_out_s : p.k_out_s;
  const int64_t b64 = static_cast<int64_t>(b), t64 = static_cast<int64_t>(t);
  return {static_cast<const T*>(is_q ? p.q : p.k) + b64 * xs.b + t64 * xs.t + h * xs.h,
          static_cast<T*>(is_q ? p.q_out : p.k_out) + b64 * ys.b + t64 * ys.t + h * ys.h,
          b64 * p.cos_b + t64 * p.cos_t};
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads, 4) rotary_rows_kernel(const RotaryParams p) {
  constexpr int N = kVec<T>;
  const int vectors = 1 << p.row_vectors_log2;
  const int item = threadIdx.x & (vectors - 1);  // the vector of the row this thread owns
  const int slot = threadIdx.x >> p.row_vectors_log2;
  const Index rows_per_step = static_cast<Index>(kThreads >> p.row_vectors_log2);
  const int half_vectors = static_cast<int>(p.rotary_dim / 2 / N);
  const bool rotated = item < 2 * half_vectors;
  const bool low = item < half_vectors;
  const int lane = threadIdx.x & 31;
  const int partner = rotated ? (low ? lane + half_vectors : lane - half_vectors) : lane;
  // y = x c + sign * partner_x * s, with s this lane's sin in the forward and the partner's in
  // the backward; sign -1 for the low half forward and the high half backward.
  const bool negate = low != p.transpose;
  const int64_t c = static_cast<int64_t>(item) * N;
  const Index heads = static_cast<Index>(p.num_q_heads + p.num_k_heads);
  const Index seq_len = static_cast<Index>(p.seq_len);
  const Index rows = static_cast<Index>(p.rows);
  const Index row0 = static_cast<Index>(blockIdx.x) * rows_per_step * kRowsPerThread + slot;

  uint4 x[kRowsPerThread], cs[kRowsPerThread], sn[kRowsPerThread];
  T* y[kRowsPerThread];
  bool live[kRowsPerThread];
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) {
    const Index row = row0 + static_cast<Index>(u) * rows_per_step;
    x[u] = cs[u] = sn[u] = make_uint4(0u, 0u, 0u, 0u);
    y[u] = nullptr;
    live[u] = row < rows;
    if (live[u]) {
      const RowAddress<T> a = row_address<T, Index>(p, row, heads, seq_len);
      y[u] = a.y;
      x[u] = load16(a.x + c);
      if (rotated) {
        cs[u] = load16(static_cast<const T*>(p.cos) + a.cos_sin + c);
        sn[u] = load16(static_cast<const T*>(p.sin) + a.cos_sin + c);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kRowsPerThread; ++u) {
    // every lane shuffles (a warp may hold rows past the end: they shuffle zeros, store nothing)
    const uint4 other_x = shfl16(x[u], partner);
    const uint4 s = p.transpose ? shfl16(sn[u], partner) : sn[u];
    if (!live[u]) continue;
    if (!rotated) {
      *reinterpret_cast<uint4*>(y[u] + c) = x[u];
      continue;
    }
    if constexpr (std::is_same_v<T, float>) {
      float out[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float turned = round_to<T>(mul_rn(element_of<T>(other_x, k), element_of<T>(s, k)));
        const float kept = round_to<T>(mul_rn(element_of<T>(x[u], k), element_of<T>(cs[u], k)));
        out[k] = add_rn(kept, negate ? -turned : turned);
      }
      *reinterpret_cast<uint4*>(y[u] + c) = pack_of<T>(out);
    } else {
      // Pairs of 16-bit values: the products by the paired 16-bit multiply (the product of two
      // 16-bit values is exact in fp32, so its fp32-then-16-bit rounding is the single rounding
      // mul.bf16x2 / mul.f16x2 do), the sum in fp32 and then rounded, as torch adds; the sign
      // folded into sin (round(b * -s) = -round(b * s)).
      const uint32_t sign = negate ? 0x80008000u : 0u;
      uint32_t out[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t kept = mul2<T>(word_of(x[u], w), word_of(cs[u], w));
        const uint32_t turned = mul2<T>(word_of(other_x, w), word_of(s, w) ^ sign);
        const uint4 sum_in = make_uint4(kept, turned, 0u, 0u);
        const float lo = add_rn(element_of<T>(sum_in, 0), element_of<T>(sum_in, 2));
        const float hi = add_rn(element_of<T>(sum_in, 1), element_of<T>(sum_in, 3));
        out[w] = pack2<T>(lo, hi);
      }
      *reinterpret_cast<uint4*>(y[u] + c) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }
}

Strides4 strides_of(const TensorRef& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

void partial_rotary_embedding(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out,
                              const TensorRef& k_out, const RotaryShape& s, bool transpose) {
  RotaryParams p{};
  p.q = in.q.data;
  p.k = in.k.data;
  p.cos = in.cos.data;
  p.sin = in.sin.data;
  p.q_out = q_out.data;
  p.k_out = k_out.data;
  p.q_s = strides_of(in.q);
  p.k_s = strides_of(in.k);
  p.q_out_s = strides_of(q_out);
  p.k_out_s = strides_of(k_out);
  p.cos_b = in.cos.stride(0);
  p.cos_t = in.cos.stride(1);
  p.sin_b = in.sin.stride(0);
  p.sin_t = in.sin.stride(1);
  p.seq_len = s.seq_len;
  p.num_q_heads = s.num_q_heads;
  p.num_k_heads = s.num_k_heads;
  p.head_dim = s.head_dim;
  p.rotary_dim = s.rotary_dim;
  p.rows = s.batch * s.seq_len * (s.num_q_heads + s.num_k_heads);
  p.transpose = transpose;
  if (p.rows == 0) return;
  const int device = in.q.device.index;
  DeviceGuard guard(device);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  dispatch_float(in.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int n = kVec<T>;
    bool vector = (s.rotary_dim / 2) % n == 0 && (s.head_dim - s.rotary_dim) % n == 0;
    for (const TensorRef* t : {&in.q, &in.k, &in.cos, &in.sin, &q_out, &k_out}) {
      vector = vector && vector_aligned(*t, n);
    }
    // The row kernel: rows of a power-of-two number of vectors dividing the block, the rotated
    // ones within the row's first warp.
    const int64_t row_vectors = s.head_dim / n;
    const int64_t half_vectors = s.rotary_dim / 2 / n;
    const bool rows_fit = vector && s.head_dim % n == 0 && row_vectors <= kThreads &&
                          (row_vectors & (row_vectors - 1)) == 0 &&
                          (row_vectors <= 32 || 2 * half_vectors <= 32);
    if (rows_fit) {
      int log2 = 0;
      while ((int64_t{1} << log2) < row_vectors) ++log2;
      p.row_vectors_log2 = log2;
      division_magic(s.num_q_heads + s.num_k_heads, p.heads_magic, p.heads_shift);
      division_magic(s.seq_len, p.seq_len_magic, p.seq_len_shift);
      const int64_t rows_per_block = (kThreads / row_vectors) * kRowsPerThread;
      const int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
      check_value(blocks <= int64_t{0x7fffffff}, "partial_rotary_embedding: ", p.rows,
                  " rows is more than the CUDA grid takes");
      // 32-bit row indices while the last block's rows fit
      if (blocks * rows_per_block <= (int64_t{1} << 31)) {
        rotary_rows_kernel<T, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
      } else {
        rotary_rows_kernel<T, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
      }
      return;
    }
    const int width = vector ? n : 1;
    const int64_t work = p.rows * ((s.rotary_dim / 2 + s.head_dim - s.rotary_dim) / width);
    const int64_t max_blocks = static_cast<int64_t>(device_info(device).sm_count) * 16;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
    // 32-bit indices while the last grid stride cannot wrap around
    const bool narrow = work <= (int64_t{1} << 31);
    if (vector && narrow) {
      rotary_generic_kernel<T, kVec<T>, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
    } else if (vector) {
      rotary_generic_kernel<T, kVec<T>, int64_t><<<blocks, kThreads, 0, stream>>>(p);
    } else if (narrow) {
      rotary_generic_kernel<T, 1, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      rotary_generic_kernel<T, 1, int64_t><<<blocks, kThreads, 0, stream>>>(p);
    }
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
