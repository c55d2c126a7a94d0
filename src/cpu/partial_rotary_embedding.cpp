// partial_rotary_embedding on the CPU (include/flashdelta/partial_rotary_embedding.h).
//
// One task per (b, t) token: its cos / sin row is read once and applied to the token's q heads
// then k heads. Forward and backward are one routine: the backward is the transposed rotation,
// which is the forward with (sin_lo, sin_hi) replaced by (-sin_hi, -sin_lo); the rounding of
// transformers' autograd follows the same pattern, so both directions round as transformers does:
//   y_lo = cast(cast(x_lo c_lo) + cast(-x_hi s_lo)),  y_hi = cast(cast(x_hi c_hi) + cast(x_lo s_hi))
#include <algorithm>

#include "core/fused_ops_backend.h"
#include "cpu/fused_ops_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {
namespace {

using flashdelta::cpu::from_float;
using flashdelta::cpu::round_to;
using flashdelta::cpu::to_float;

template <typename T>
const T* at3(const TensorRef& t, int64_t b, int64_t i) {
  return static_cast<const T*>(t.data) + b * t.stride(0) + i * t.stride(1);
}

template <typename T>
void rotate_heads(const TensorRef& x, const TensorRef& y, int64_t b, int64_t t, int64_t heads,
                  const T* cos, const T* sin, const RotaryShape& s, bool transpose) {
  const int64_t half = s.rotary_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* xr = static_cast<const T*>(x.data) + b * x.stride(0) + t * x.stride(1) +
                  h * x.stride(2);
    T* yr = static_cast<T*>(y.data) + b * y.stride(0) + t * y.stride(1) + h * y.stride(2);
    for (int64_t i = 0; i < half; ++i) {
      const float lo = to_float(xr[i]), hi = to_float(xr[i + half]);
      const float c_lo = to_float(cos[i]), c_hi = to_float(cos[i + half]);
      float s_lo = to_float(sin[i]), s_hi = to_float(sin[i + half]);
      if (transpose) {
        const float tmp = s_lo;
        s_lo = -s_hi;
        s_hi = -tmp;
      }
      yr[i] = from_float<T>(round_to<T>(lo * c_lo) + round_to<T>(-hi * s_lo));
      yr[i + half] = from_float<T>(round_to<T>(hi * c_hi) + round_to<T>(lo * s_hi));
    }
    std::copy(xr + s.rotary_dim, xr + s.head_dim, yr + s.rotary_dim);
  }
}

template <typename T>
void run(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out, const TensorRef& k_out,
         const RotaryShape& s, bool transpose) {
  flashdelta::cpu::parallel_for(s.batch * s.seq_len, [&](int64_t token, int) {
    const int64_t b = token / s.seq_len, t = token % s.seq_len;
    const T* cos = at3<T>(in.cos, b, t);
    const T* sin = at3<T>(in.sin, b, t);
    rotate_heads<T>(in.q, q_out, b, t, s.num_q_heads, cos, sin, s, transpose);
    rotate_heads<T>(in.k, k_out, b, t, s.num_k_heads, cos, sin, s, transpose);
  });
}

}  // namespace

void partial_rotary_embedding(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out,
                              const TensorRef& k_out, const RotaryShape& s, bool transpose) {
  flashdelta::cpu::dispatch_float(in.q.dtype, [&](auto t) {
    run<decltype(t)>(in, q_out, k_out, s, transpose);
  });
}

}  // namespace flashdelta::detail::cpu
