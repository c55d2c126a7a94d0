// moe_experts on the CPU: the same math as the CUDA grouped GEMMs, one row (forward, input
// gradients) or one weight row (weight gradients) per unit of work, fp32 accumulation, and
// gate_up / act / d_gate_up rounded to the storage dtype where the CUDA path stores them.
//
// Rows are split across the thread pool in blocks; a row finds its expert by binary search in
// expert_offsets. Weight gradients are split by (expert, output row): each output element is
// summed by one thread over its expert's rows in ascending order (deterministic).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/moe_backend.h"
#include "cpu/moe_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {

using flashdelta::cpu::parallel_for;
using flashdelta::cpu::to_float;
using namespace flashdelta::cpu::moe;

namespace {

constexpr int64_t kRowsPerTask = 16;
constexpr int64_t kDots = 8;  // dot products computed side by side (independent FMA chains)

float silu(float g) { return g / (1.0f + std::exp(-g)); }

// The expert of row r: the e with offsets[e] <= r < offsets[e + 1], or -1 for a dropped row.
int64_t expert_of_row(const int32_t* offsets, int64_t E, int64_t r) {
  if (r >= offsets[E]) return -1;
  const int32_t* it = std::upper_bound(offsets, offsets + E + 1, static_cast<int32_t>(r));
  return (it - offsets) - 1;
}

template <typename S>
struct Experts {
  const MoeExpertsShape& s;
  const MoeExpertsInputs& in;
  const int32_t* offsets;

  float x(const TensorRef& t, int64_t r, int64_t c) const {
    return to_float(static_cast<const S*>(t.data)[r * t.strides[0] + c]);
  }
  float w1(int64_t e, int64_t j, int64_t h) const {  // gate_up_proj[e, j, h]
    const TensorRef& w = in.gate_up_proj;
    return to_float(static_cast<const S*>(w.data)[e * w.strides[0] + j * w.strides[1] + h]);
  }
  float w2(int64_t e, int64_t h, int64_t i) const {  // down_proj[e, h, i]
    const TensorRef& w = in.down_proj;
    return to_float(static_cast<const S*>(w.data)[e * w.strides[0] + h * w.strides[1] + i]);
  }

  void forward(const MoeExpertsForwardOutputs& out) const {
    const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate, E = s.num_experts;
    const DType dt = in.hidden.dtype;
    parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
      std::vector<float> xr(H), act(I);
      for (int64_t r = task * kRowsPerTask; r < std::min(N, (task + 1) * kRowsPerTask); ++r) {
        const int64_t e = expert_of_row(offsets, E, r);
        if (e < 0) {
          for (int64_t c = 0; c < 2 * I; ++c) store_flat(out.gate_up, r * 2 * I + c, 0.0f);
          for (int64_t c = 0; c < I; ++c) store_flat(out.act, r * I + c, 0.0f);
          for (int64_t c = 0; c < H; ++c) store_flat(out.out, r * H + c, 0.0f);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) xr[h] = x(in.hidden, r, h);
        // Dot products, kDots at a time: independent accumulation chains (each element still
        // summed in h order, so the results are those of one chain at a time).
        for (int64_t i0 = 0; i0 < I; i0 += kDots) {
          const int64_t n = std::min<int64_t>(kDots, I - i0);
          float g[kDots] = {}, u[kDots] = {};
          for (int64_t h = 0; h < H; ++h) {
            for (int64_t q = 0; q < n; ++q) {
              g[q] += xr[h] * w1(e, i0 + q, h);
              u[q] += xr[h] * w1(e, I + i0 + q, h);
            }
          }
          for (int64_t q = 0; q < n; ++q) {
            const int64_t i = i0 + q;
            const float gi = round_to(dt, g[q]), ui = round_to(dt, u[q]);
            store_flat(out.gate_up, r * 2 * I + i, gi);
            store_flat(out.gate_up, r * 2 * I + I + i, ui);
            act[i] = round_to(dt, silu(gi) * ui);
            store_flat(out.act, r * I + i, act[i]);
          }
        }
        for (int64_t h0 = 0; h0 < H; h0 += kDots) {
          const int64_t n = std::min<int64_t>(kDots, H - h0);
          float y[kDots] = {};
          for (int64_t i = 0; i < I; ++i) {
            for (int64_t q = 0; q < n; ++q) y[q] += act[i] * w2(e, h0 + q, i);
          }
          for (int64_t q = 0; q < n; ++q) store_flat(out.out, r * H + h0 + q, y[q]);
        }
      }
    });
  }

  void backward(const MoeExpertsBackwardArgs& a) const {
    const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate, E = s.num_experts;
    const DType dt = in.hidden.dtype;
    // Input gradient, row by row; d_gate_up and act kept (rounded) for the weight gradients.
    parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
      std::vector<float> dy(H), dgu(2 * I), d_act(I), dx(H);
      for (int64_t r = task * kRowsPerTask; r < std::min(N, (task + 1) * kRowsPerTask); ++r) {
        const int64_t e = expert_of_row(offsets, E, r);
        if (e < 0) {
          for (int64_t c = 0; c < 2 * I; ++c) store_flat(a.d_gate_up, r * 2 * I + c, 0.0f);
          for (int64_t c = 0; c < I; ++c) store_flat(a.act, r * I + c, 0.0f);
          for (int64_t c = 0; c < H; ++c) store_flat(a.d_hidden, r * H + c, 0.0f);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) dy[h] = x(a.d_out, r, h);
        // d_act[i] = sum_h dy[h] W2[e, h, i], h outer: W2's rows read contiguously, every i its
        // own accumulator (summed in h order as before).
        std::fill(d_act.begin(), d_act.end(), 0.0f);
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t i = 0; i < I; ++i) d_act[i] += dy[h] * w2(e, h, i);
        }
        for (int64_t i = 0; i < I; ++i) {
          const float g = x(a.gate_up, r, i), u = x(a.gate_up, r, I + i);
          const float sig = 1.0f / (1.0f + std::exp(-g));
          dgu[i] = round_to(dt, d_act[i] * u * sig * (1.0f + g * (1.0f - sig)));
          dgu[I + i] = round_to(dt, d_act[i] * g * sig);
          store_flat(a.d_gate_up, r * 2 * I + i, dgu[i]);
          store_flat(a.d_gate_up, r * 2 * I + I + i, dgu[I + i]);
          store_flat(a.act, r * I + i, silu(g) * u);
        }
        // d_hidden[h] = sum_j dgu[j] W1[e, j, h], j outer (rows of W1 contiguous, j order kept).
        std::fill(dx.begin(), dx.end(), 0.0f);
        for (int64_t j = 0; j < 2 * I; ++j) {
          for (int64_t h = 0; h < H; ++h) dx[h] += dgu[j] * w1(e, j, h);
        }
        for (int64_t h = 0; h < H; ++h) store_flat(a.d_hidden, r * H + h, dx[h]);
      }
    });
    // Weight gradients: one task per (expert, output row).
    if (a.d_gate_up_proj.defined()) {
      parallel_for(E * 2 * I, [&](int64_t task, int) {
        const int64_t e = task / (2 * I), j = task % (2 * I);
        std::vector<float> acc(H, 0.0f);
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
          const float d = x(a.d_gate_up, r, j);
          for (int64_t h = 0; h < H; ++h) acc[h] += d * x(in.hidden, r, h);
        }
        for (int64_t h = 0; h < H; ++h) store_flat(a.d_gate_up_proj, (e * 2 * I + j) * H + h, acc[h]);
      });
    }
    if (a.d_down_proj.defined()) {
      parallel_for(E * H, [&](int64_t task, int) {
        const int64_t e = task / H, h = task % H;
        std::vector<float> acc(I, 0.0f);
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
          const float d = x(a.d_out, r, h);
          for (int64_t i = 0; i < I; ++i) acc[i] += d * x(a.act, r, i);
        }
        for (int64_t i = 0; i < I; ++i) store_flat(a.d_down_proj, (e * H + h) * I + i, acc[i]);
      });
    }
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
