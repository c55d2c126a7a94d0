// partial_rotary_embedding on the GPU (include/flashdelta/partial_rotary_embedding.h).
//
// The rows are the (b, t, head) triples of q followed by those of k: B * T * (H + HK) rows of
// head_dim channels. A thread handles one work item of a row: either a 16-byte vector of the
// rotated half-pair (channels [i, i + N) together with [i + h, i + h + N), h = rotary_dim / 2:
// the rotation mixes exactly those two), or a 16-byte vector of the pass-through channels
// [rotary_dim, head_dim), copied. Grid-strided over rows * items_per_row; cos / sin are read per
// token (shared by its H + HK heads, so L1/L2-resident). One read of q, k and one write of the
// outputs: the floor. The backward is the same kernel applying the transposed rotation
// (sin_lo, sin_hi) -> (-sin_hi, -sin_lo), which also reproduces the rounding of transformers'
// autograd. Products and sums are rounded to the storage type as transformers' composition does.
// Vector path when h, head_dim - rotary_dim and every outer stride are multiples of N and the
// pointers are 16-byte aligned; otherwise N = 1.
#include <algorithm>

#include "core/fused_ops_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kThreads = 256;

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
};

// Index: uint32_t when the work count allows (three 64-bit divisions per vector would cost more
// than its memory traffic), else int64_t. Offsets are 64-bit either way.
template <typename T, int N, typename Index>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
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
    const int width = vector ? n : 1;
    const int64_t work = p.rows * ((s.rotary_dim / 2 + s.head_dim - s.rotary_dim) / width);
    const int64_t max_blocks = static_cast<int64_t>(device_info(device).sm_count) * 16;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
    // 32-bit indices while the last grid stride cannot wrap around
    const bool narrow = work <= (int64_t{1} << 31);
    if (vector && narrow) {
      rotary_kernel<T, kVec<T>, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
    } else if (vector) {
      rotary_kernel<T, kVec<T>, int64_t><<<blocks, kThreads, 0, stream>>>(p);
    } else if (narrow) {
      rotary_kernel<T, 1, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      rotary_kernel<T, 1, int64_t><<<blocks, kThreads, 0, stream>>>(p);
    }
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
