// rms_norm and rms_norm_gated on the CPU (see include/flashdelta/rms_norm.h for the math).
//
// Forward: rows in parallel; per row one pass for sum(x^2) (double accumulation), one to write y.
// Backward, per row with n = x r and dn the gradient reaching n:
//   dx = r (dn - n mean(dn n))
// where dn = dy (1 + w) (rms_norm) or dy silu(gate) w (rms_norm_gated). The weight gradient is
// summed deterministically: the rows are cut into kBackwardChunks fixed chunks (whatever the
// thread count), each writes its fp32 partial sums to the workspace, and a second pass adds the
// chunks in order.
#include <algorithm>
#include <cmath>

#include "core/fused_ops_backend.h"
#include "cpu/fused_ops_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {
namespace {

using flashdelta::cpu::bf16;
using flashdelta::cpu::f16;
using flashdelta::cpu::load_any;
using flashdelta::cpu::round_to;
using flashdelta::cpu::row_ptr;
using flashdelta::cpu::sigmoid;
using flashdelta::cpu::to_float;
using flashdelta::cpu::from_float;

constexpr int64_t kBackwardChunks = 64;
constexpr int64_t kRowsPerTask = 16;

int64_t num_chunks(const RowsShape& s) { return std::min(s.rows, kBackwardChunks); }

// p = weight * n, rounded to x's dtype when weight has x's dtype (torch's type promotion).
template <typename T>
inline float scaled(float w, float n_rounded, bool round_product) {
  const float p = w * n_rounded;
  return round_product ? round_to<T>(p) : p;
}

template <typename T>
void forward_rows(const RmsNormInputs& in, const RmsNormForwardOutputs& out, const RowsShape& s) {
  const bool gated = in.gate.defined();
  const bool round_product = in.weight.dtype == in.x.dtype;
  const int64_t D = s.dim;
  const int64_t tasks = (s.rows + kRowsPerTask - 1) / kRowsPerTask;
  flashdelta::cpu::parallel_for(tasks, [&](int64_t task, int) {
    const int64_t end = std::min(s.rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      const T* x = row_ptr<const T>(in.x, r);
      T* y = row_ptr<T>(out.y, r);
      double sum_sq = 0.0;
      for (int64_t j = 0; j < D; ++j) {
        const float v = to_float(x[j]);
        sum_sq += static_cast<double>(v) * v;
      }
      const float rstd =
          1.0f / std::sqrt(static_cast<float>(sum_sq / static_cast<double>(D)) +
                           static_cast<float>(in.eps));
      static_cast<float*>(out.rstd.data)[r] = rstd;
      if (!gated) {
        for (int64_t j = 0; j < D; ++j) {
          y[j] = from_float<T>(to_float(x[j]) * rstd * (1.0f + load_any(in.weight, j)));
        }
      } else {
        const T* g = row_ptr<const T>(in.gate, r);
        for (int64_t j = 0; j < D; ++j) {
          const float n = round_to<T>(to_float(x[j]) * rstd);
          const float p = scaled<T>(load_any(in.weight, j), n, round_product);
          const float z = to_float(g[j]);
          y[j] = from_float<T>(p * (z * sigmoid(z)));
        }
      }
    }
  });
}

template <typename T>
void backward_rows(const RmsNormInputs& in, const RmsNormBackwardArgs& a, const RowsShape& s) {
  const bool gated = in.gate.defined();
  const bool round_product = in.weight.dtype == in.x.dtype;
  const int64_t D = s.dim;
  const int64_t chunks = num_chunks(s);
  const int64_t rows_per_chunk = (s.rows + chunks - 1) / chunks;
  float* partials = static_cast<float*>(a.workspace.data);  // [chunks, D]
  const float* rstd = static_cast<const float*>(a.rstd.data);
  flashdelta::cpu::parallel_for(chunks, [&](int64_t chunk, int) {
    float* dw = partials + chunk * D;
    std::fill(dw, dw + D, 0.0f);
    const int64_t end = std::min(s.rows, (chunk + 1) * rows_per_chunk);
    for (int64_t r = chunk * rows_per_chunk; r < end; ++r) {
      const T* x = row_ptr<const T>(in.x, r);
      const T* dy = row_ptr<const T>(a.dy, r);
      T* dx = row_ptr<T>(a.dx, r);
      const float rs = rstd[r];
      // Pass 1: dn (kept in dx's row only as the final result; recomputed in pass 2),
      // sum(dn n), the weight gradient and, gated, the gate gradient.
      double dot = 0.0;
      for (int64_t j = 0; j < D; ++j) {
        const float n = to_float(x[j]) * rs;
        const float w = load_any(in.weight, j);
        const float g = to_float(dy[j]);
        float dn;
        if (!gated) {
          dn = g * (1.0f + w);
          dw[j] += g * n;
        } else {
          const float z = to_float(row_ptr<const T>(in.gate, r)[j]);
          const float sig = sigmoid(z);
          const float n_rounded = round_to<T>(n);
          const float p = scaled<T>(w, n_rounded, round_product);
          const float dp = g * (z * sig);
          row_ptr<T>(a.dgate, r)[j] = from_float<T>(g * p * (sig * (1.0f + z * (1.0f - sig))));
          dn = dp * w;
          dw[j] += dp * n_rounded;
        }
        dot += static_cast<double>(dn) * n;
      }
      const float mean_dot = static_cast<float>(dot / static_cast<double>(D));
      for (int64_t j = 0; j < D; ++j) {
        const float n = to_float(x[j]) * rs;
        const float w = load_any(in.weight, j);
        const float g = to_float(dy[j]);
        float dn;
        if (!gated) {
          dn = g * (1.0f + w);
        } else {
          const float z = to_float(row_ptr<const T>(in.gate, r)[j]);
          dn = g * (z * sigmoid(z)) * w;
        }
        dx[j] = from_float<T>(rs * (dn - n * mean_dot));
      }
    }
  });
  // Second pass: chunks in order, columns in parallel.
  const int64_t column_tasks = (D + 255) / 256;
  flashdelta::cpu::parallel_for(column_tasks, [&](int64_t task, int) {
    const int64_t end = std::min(D, (task + 1) * 256);
    for (int64_t j = task * 256; j < end; ++j) {
      float total = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) total += partials[c * D + j];
      flashdelta::cpu::store_any(a.dweight, j, total);
    }
  });
}

}  // namespace

void rms_norm_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out,
                      const RowsShape& s) {
  flashdelta::cpu::dispatch_float(in.x.dtype, [&](auto t) {
    forward_rows<decltype(t)>(in, out, s);
  });
}

size_t rms_norm_backward_workspace_bytes(const RowsShape& s) {
  return static_cast<size_t>(num_chunks(s) * s.dim) * sizeof(float);
}

void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& a, const RowsShape& s) {
  if (s.rows == 0) {
    for (int64_t j = 0; j < s.dim; ++j) flashdelta::cpu::store_any(a.dweight, j, 0.0f);
    return;
  }
  flashdelta::cpu::dispatch_float(in.x.dtype, [&](auto t) {
    backward_rows<decltype(t)>(in, a, s);
  });
}

}  // namespace flashdelta::detail::cpu
