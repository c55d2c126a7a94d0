// swiglu and attention_gate on the CPU (include/flashdelta/gated_product.h).
//
// Both are out = value * act(gate) with act = silu (swiglu) or sigmoid (attention_gate),
// rounded as transformers' compositions round: a = cast(act(gate)), out = cast(value * a).
// The backward follows the autograd of that composition, rounding where it rounds:
//   d_value = cast(d_out * a);  d_a = cast(d_out * value);
//   d_gate  = cast(d_a * sig * (1 + gate (1 - sig)))   silu   (sig = sigmoid(gate))
//   d_gate  = cast(d_a * (1 - a) * a)                   sigmoid (from the rounded output a)
// so bf16 gradients equal transformers' too. Rows in parallel; any row strides.
#include <algorithm>
#include <cmath>

#include "core/fused_ops_backend.h"
#include "cpu/fused_ops_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {
namespace {

using flashdelta::cpu::from_float;
using flashdelta::cpu::round_to;
using flashdelta::cpu::row_ptr;
using flashdelta::cpu::to_float;

constexpr int64_t kElementsPerTask = 1 << 14;

// torch's formulas, operation for operation.
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

template <typename Body>
void for_rows(const RowsShape& s, Body&& body) {
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, s.dim));
  const int64_t tasks = (s.rows + rows_per_task - 1) / rows_per_task;
  flashdelta::cpu::parallel_for(tasks, [&](int64_t task, int) {
    const int64_t end = std::min(s.rows, (task + 1) * rows_per_task);
    for (int64_t r = task * rows_per_task; r < end; ++r) body(r);
  });
}

template <typename T>
void forward(GateActivation act, const GatedProductArgs& in, const TensorRef& out,
             const RowsShape& s) {
  for_rows(s, [&](int64_t r) {
    const T* v = row_ptr<const T>(in.value, r);
    const T* g = row_ptr<const T>(in.gate, r);
    T* o = row_ptr<T>(out, r);
    for (int64_t j = 0; j < s.dim; ++j) {
      const float z = to_float(g[j]);
      const float a = round_to<T>(act == GateActivation::kSilu ? silu(z) : sigmoid(z));
      o[j] = from_float<T>(to_float(v[j]) * a);
    }
  });
}

template <typename T>
void backward(GateActivation act, const GatedProductArgs& in, const GatedProductGradients& gr,
              const RowsShape& s) {
  for_rows(s, [&](int64_t r) {
    const T* v = row_ptr<const T>(in.value, r);
    const T* g = row_ptr<const T>(in.gate, r);
    const T* d_out = row_ptr<const T>(gr.d_out, r);
    T* d_value = row_ptr<T>(gr.d_value, r);
    T* d_gate = row_ptr<T>(gr.d_gate, r);
    for (int64_t j = 0; j < s.dim; ++j) {
      const float z = to_float(g[j]);
      const float dy = to_float(d_out[j]);
      const float d_a = round_to<T>(dy * to_float(v[j]));
      float a, dz;
      if (act == GateActivation::kSilu) {
        const float sig = sigmoid(z);
        a = round_to<T>(silu(z));
        dz = d_a * sig * (1.0f + z * (1.0f - sig));
      } else {
        a = round_to<T>(sigmoid(z));
        dz = d_a * (1.0f - a) * a;
      }
      d_value[j] = from_float<T>(dy * a);
      d_gate[j] = from_float<T>(dz);
    }
  });
}

}  // namespace

void gated_product_forward(GateActivation act, const GatedProductArgs& in, const TensorRef& out,
                           const RowsShape& s) {
  flashdelta::cpu::dispatch_float(in.value.dtype, [&](auto t) {
    forward<decltype(t)>(act, in, out, s);
  });
}

void gated_product_backward(GateActivation act, const GatedProductArgs& in,
                            const GatedProductGradients& grads, const RowsShape& s) {
  flashdelta::cpu::dispatch_float(in.value.dtype, [&](auto t) {
    backward<decltype(t)>(act, in, grads, s);
  });
}

}  // namespace flashdelta::detail::cpu
