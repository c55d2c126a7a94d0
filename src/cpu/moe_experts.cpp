// moe_experts on the CPU: the same math as the CUDA grouped GEMMs, per expert as dense blocked
// GEMMs (cpu/gemm.h), fp32 accumulation, and gate_up / act / d_gate_up rounded to the storage
// dtype where the CUDA path stores them.
//
// Forward and input gradients: one task per block of up to kRowBlock rows of one expert, the
// expert's weights read once per block (the first version ran a row at a time: every row re-read
// its expert's weights, a dot product per output). Weight gradients: one task per expert, its
// rows as the reduction dimension. Every output element is summed by one task in ascending k
// (h, i, j or row) order, whatever the thread count: deterministic. Rows past expert_offsets[E]
// (dropped) get zeros.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/moe_backend.h"
#include "cpu/gemm.h"
#include "cpu/moe_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {

using flashdelta::cpu::gemm;
using flashdelta::cpu::Mat;
using flashdelta::cpu::parallel_for;
using flashdelta::cpu::to_float;
using namespace flashdelta::cpu::moe;

namespace {

constexpr int64_t kRowBlock = 64;

float silu(float g) { return g / (1.0f + std::exp(-g)); }

// Rows [r0, r1) of expert e.
struct RowBlock {
  int64_t e, r0, r1;
};
std::vector<RowBlock> row_blocks(const int32_t* offsets, int64_t E) {
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kRowBlock) {
      blocks.push_back({e, r, std::min<int64_t>(offsets[e + 1], r + kRowBlock)});
    }
  }
  return blocks;
}

// rows x cols of a storage-typed matrix (unit column stride) as an fp32 matrix: a view when the
// storage is fp32, else a converted copy in `buf`.
template <typename S>
Mat<float> as_f32(const void* base, int64_t offset, int64_t rows, int64_t cols, int64_t row_stride,
                  std::vector<float>& buf) {
  const S* p = static_cast<const S*>(base) + offset;
  if constexpr (std::is_same_v<S, float>) {
    return Mat<float>(const_cast<float*>(p), rows, cols, row_stride);
  } else {
    buf.resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) buf[r * cols + c] = to_float(p[r * row_stride + c]);
    return Mat<float>(buf.data(), rows, cols);
  }
}

template <typename S>
struct Experts {
  const MoeExpertsShape& s;
  const MoeExpertsInputs& in;
  const int32_t* offsets;

  // Rows [r0, r1) of an [N, cols] tensor (unit column stride) as fp32.
  Mat<float> rows_of(const TensorRef& t, int64_t r0, int64_t r1, int64_t cols,
                     std::vector<float>& buf) const {
    return as_f32<S>(t.data, r0 * t.strides[0], r1 - r0, cols, t.strides[0], buf);
  }
  Mat<float> w1(int64_t e, std::vector<float>& buf) const {  // gate_up_proj[e]: [2I, H]
    const TensorRef& w = in.gate_up_proj;
    return as_f32<S>(w.data, e * w.strides[0], 2 * s.intermediate, s.hidden, w.strides[1], buf);
  }
  Mat<float> w2(int64_t e, std::vector<float>& buf) const {  // down_proj[e]: [H, I]
    const TensorRef& w = in.down_proj;
    return as_f32<S>(w.data, e * w.strides[0], s.hidden, s.intermediate, w.strides[1], buf);
  }
  static void store_rows(const TensorRef& t, int64_t r0, const Mat<float>& m) {
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t c = 0; c < m.cols; ++c) store_flat(t, (r0 + r) * m.cols + c, m(r, c));
  }
  // Zeros for the rows past expert_offsets[E] of contiguous [N, cols] outputs.
  void zero_dropped(const TensorRef& t, int64_t cols) const {
    for (int64_t i = offsets[s.num_experts] * cols; i < s.num_rows * cols; ++i) {
      store_flat(t, i, 0.0f);
    }
  }

  void forward(const MoeExpertsForwardOutputs& out) const {
    const int64_t H = s.hidden, I = s.intermediate;
    const DType dt = in.hidden.dtype;
    const std::vector<RowBlock> blocks = row_blocks(offsets, s.num_experts);
    parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t task, int) {
      const RowBlock b = blocks[task];
      const int64_t m = b.r1 - b.r0;
      std::vector<float> xbuf, w1buf, w2buf, pack(static_cast<size_t>(std::max(2 * I * H, H * I)));
      std::vector<float> gu(m * 2 * I), act(m * I), y(m * H);
      const Mat<float> x = rows_of(in.hidden, b.r0, b.r1, H, xbuf);
      // gate_up = x W1^T, rounded as stored; act = silu(g) u, rounded as stored.
      gemm<float>(Mat<float>(gu.data(), m, 2 * I), x, w1(b.e, w1buf).t(), 1.0f, false, pack.data());
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t i = 0; i < I; ++i) {
          const float g = round_to(dt, gu[r * 2 * I + i]), u = round_to(dt, gu[r * 2 * I + I + i]);
          gu[r * 2 * I + i] = g;
          gu[r * 2 * I + I + i] = u;
          act[r * I + i] = round_to(dt, silu(g) * u);
        }
      }
      // out = act W2^T
      gemm<float>(Mat<float>(y.data(), m, H), Mat<float>(act.data(), m, I), w2(b.e, w2buf).t(),
                  1.0f, false, pack.data());
      store_rows(out.gate_up, b.r0, Mat<float>(gu.data(), m, 2 * I));
      store_rows(out.act, b.r0, Mat<float>(act.data(), m, I));
      store_rows(out.out, b.r0, Mat<float>(y.data(), m, H));
    });
    zero_dropped(out.gate_up, 2 * I);
    zero_dropped(out.act, I);
    zero_dropped(out.out, H);
  }

  void backward(const MoeExpertsBackwardArgs& a) const {
    const int64_t H = s.hidden, I = s.intermediate, E = s.num_experts;
    const DType dt = in.hidden.dtype;
    const std::vector<RowBlock> blocks = row_blocks(offsets, E);
    // Input gradient per row block; d_gate_up and act stored (rounded) for the weight gradients.
    parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t task, int) {
      const RowBlock b = blocks[task];
      const int64_t m = b.r1 - b.r0;
      std::vector<float> dybuf, gubuf, w1buf, w2buf;
      std::vector<float> d_act(m * I), dgu(m * 2 * I), act(m * I), dx(m * H);
      const Mat<float> dy = rows_of(a.d_out, b.r0, b.r1, H, dybuf);
      const Mat<float> gu = rows_of(a.gate_up, b.r0, b.r1, 2 * I, gubuf);
      // d_act = dy W2
      gemm<float>(Mat<float>(d_act.data(), m, I), dy, w2(b.e, w2buf), 1.0f, false, nullptr);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t i = 0; i < I; ++i) {
          const float g = gu(r, i), u = gu(r, I + i), da = d_act[r * I + i];
          const float sig = 1.0f / (1.0f + std::exp(-g));
          dgu[r * 2 * I + i] = round_to(dt, da * u * sig * (1.0f + g * (1.0f - sig)));
          dgu[r * 2 * I + I + i] = round_to(dt, da * g * sig);
          act[r * I + i] = silu(g) * u;
        }
      }
      // d_hidden = d_gate_up W1
      gemm<float>(Mat<float>(dx.data(), m, H), Mat<float>(dgu.data(), m, 2 * I), w1(b.e, w1buf),
                  1.0f, false, nullptr);
      store_rows(a.d_gate_up, b.r0, Mat<float>(dgu.data(), m, 2 * I));
      store_rows(a.act, b.r0, Mat<float>(act.data(), m, I));
      store_rows(a.d_hidden, b.r0, Mat<float>(dx.data(), m, H));
    });
    zero_dropped(a.d_gate_up, 2 * I);
    zero_dropped(a.act, I);
    zero_dropped(a.d_hidden, H);
    if (!a.d_gate_up_proj.defined() && !a.d_down_proj.defined()) return;
    // Weight gradients, one task per expert, its rows (ascending) the reduction dimension:
    // dW1[e] = d_gate_up_e^T x_e,  dW2[e] = d_out_e^T act_e.
    parallel_for(E, [&](int64_t e, int) {
      const int64_t r0 = offsets[e], r1 = offsets[e + 1];
      std::vector<float> xbuf, dgubuf, dybuf, actbuf, dw;
      if (a.d_gate_up_proj.defined()) {
        dw.assign(2 * I * H, 0.0f);
        if (r1 > r0) {
          gemm<float>(Mat<float>(dw.data(), 2 * I, H),
                      rows_of(a.d_gate_up, r0, r1, 2 * I, dgubuf).t(),
                      rows_of(in.hidden, r0, r1, H, xbuf), 1.0f, false, nullptr);
        }
        for (int64_t i = 0; i < 2 * I * H; ++i) {
          store_flat(a.d_gate_up_proj, e * 2 * I * H + i, dw[i]);
        }
      }
      if (a.d_down_proj.defined()) {
        dw.assign(H * I, 0.0f);
        if (r1 > r0) {
          gemm<float>(Mat<float>(dw.data(), H, I), rows_of(a.d_out, r0, r1, H, dybuf).t(),
                      rows_of(a.act, r0, r1, I, actbuf), 1.0f, false, nullptr);
        }
        for (int64_t i = 0; i < H * I; ++i) store_flat(a.d_down_proj, e * H * I + i, dw[i]);
      }
    });
  }
};

}  // namespace

void moe_experts_forward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                         const MoeExpertsForwardOutputs& out) {
  const int32_t* offsets = static_cast<const int32_t*>(in.expert_offsets.data);
  visit_float(in.hidden.dtype, [&](auto tag) {
    Experts<decltype(tag)>{s, in, offsets}.forward(out);
  });
}

void moe_experts_backward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                          const MoeExpertsBackwardArgs& a) {
  const int32_t* offsets = static_cast<const int32_t*>(in.expert_offsets.data);
  visit_float(in.hidden.dtype, [&](auto tag) {
    Experts<decltype(tag)>{s, in, offsets}.backward(a);
  });
}

}  // namespace flashdelta::detail::cpu
