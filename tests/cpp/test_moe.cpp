// The mixture-of-experts ops on the CPU (fp32) against double-precision references written out
// here: moe_router (softmax, top-k, renormalisation and its gradient against finite
// differences), moe_permute (stable counting sort, dropped ids), moe_unpermute, and moe_experts
// (forward, input and weight gradients against finite differences of a scalar loss).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "flashdelta/moe_experts.h"
#include "flashdelta/moe_permute.h"
#include "flashdelta/moe_router.h"

namespace {

using flashdelta::DType;
using flashdelta::make_tensor_ref;

std::vector<float> random_vector(size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// ---------------------------------------------------------------------------------- router

void router_reference(const std::vector<float>& logits, int64_t T, int64_t E, int64_t K,
                      bool normalize, std::vector<double>& w, std::vector<int64_t>& idx) {
  w.assign(T * K, 0.0);
  idx.assign(T * K, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(E);
    double m = -INFINITY, s = 0.0;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, double(logits[t * E + e]));
    for (int64_t e = 0; e < E; ++e) s += p[e] = std::exp(logits[t * E + e] - m);
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double sum = 0.0;
    for (int64_t j = 0; j < K; ++j) sum += p[order[j]] / s;
    for (int64_t j = 0; j < K; ++j) {
      idx[t * K + j] = order[j];
      w[t * K + j] = p[order[j]] / s / (normalize ? sum : 1.0);
    }
  }
}

class MoeRouter : public ::testing::TestWithParam<bool> {};

TEST_P(MoeRouter, ForwardAndGradient) {
  const bool normalize = GetParam();
  const int64_t T = 5, E = 9, K = 3;
  std::vector<float> logits = random_vector(T * E, 1, 2.0f);
  std::vector<float> w(T * K), d_logits(T * E);
  std::vector<int64_t> idx(T * K);
  flashdelta::MoeRouterInputs in{make_tensor_ref(logits.data(), DType::kFloat32, {T, E}), K,
                                 normalize};
  flashdelta::moe_router_forward(in, {make_tensor_ref(w.data(), DType::kFloat32, {T, K}),
                                      make_tensor_ref(idx.data(), DType::kInt64, {T, K})});
  std::vector<double> ref_w;
  std::vector<int64_t> ref_idx;
  router_reference(logits, T, E, K, normalize, ref_w, ref_idx);
  EXPECT_EQ(idx, ref_idx);
  for (int64_t i = 0; i < T * K; ++i) EXPECT_NEAR(w[i], ref_w[i], 1e-6);

  // Gradient of L = sum_j c_j w_j against central differences (the selection held fixed).
  std::vector<float> c = random_vector(T * K, 2);
  flashdelta::moe_router_backward(in, {make_tensor_ref(idx.data(), DType::kInt64, {T, K}),
                                       make_tensor_ref(c.data(), DType::kFloat32, {T, K}),
                                       make_tensor_ref(d_logits.data(), DType::kFloat32, {T, E})});
  const double h = 1e-3;
  for (int64_t i = 0; i < T * E; ++i) {
    auto loss = [&](double delta) {
      std::vector<float> l = logits;
      l[i] += static_cast<float>(delta);
      std::vector<double> ww;
      std::vector<int64_t> ii;
      router_reference(l, T, E, K, normalize, ww, ii);
      double s = 0.0;
      for (int64_t j = 0; j < T * K; ++j) s += c[j] * ww[j];
      return s;
    };
    EXPECT_NEAR(d_logits[i], (loss(h) - loss(-h)) / (2 * h), 2e-3) << "logit " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Normalize, MoeRouter, ::testing::Values(true, false));

TEST(MoeRouter, BadTopK) {
  std::vector<float> logits(8);
  std::vector<float> w(9);
  std::vector<int64_t> idx(9);
  flashdelta::MoeRouterInputs in{make_tensor_ref(logits.data(), DType::kFloat32, {1, 8}), 9, true};
  EXPECT_THROW(flashdelta::moe_router_forward(
                   in, {make_tensor_ref(w.data(), DType::kFloat32, {1, 9}),
                        make_tensor_ref(idx.data(), DType::kInt64, {1, 9})}),
               flashdelta::Error);
}

// ---------------------------------------------------------------------------------- permute

TEST(MoePermute, StableCountingSortDropsOutOfRange) {
  const int64_t T = 6, K = 2, E = 3, H = 2;
  std::vector<int64_t> indices = {2, 0, 1, 2, 3, 0, 0, -1, 2, 1, 1, 1};  // 3 and -1: dropped
  std::vector<float> hidden(T * H);
  std::iota(hidden.begin(), hidden.end(), 0.0f);
  std::vector<float> permuted(T * K * H);
  std::vector<int32_t> sorted(T * K), position(T * K), offsets(E + 1);
  flashdelta::MoePermuteArgs a;
  a.hidden = make_tensor_ref(hidden.data(), DType::kFloat32, {T, H});
  a.indices = make_tensor_ref(indices.data(), DType::kInt64, {T, K});
  a.num_experts = E;
  a.permuted = make_tensor_ref(permuted.data(), DType::kFloat32, {T * K, H});
  a.sorted_pairs = make_tensor_ref(sorted.data(), DType::kInt32, {T * K});
  a.pair_position = make_tensor_ref(position.data(), DType::kInt32, {T * K});
  a.expert_offsets = make_tensor_ref(offsets.data(), DType::kInt32, {E + 1});
  flashdelta::moe_permute(a);
  EXPECT_EQ(offsets, (std::vector<int32_t>{0, 3, 7, 10}));
  EXPECT_EQ(sorted, (std::vector<int32_t>{1, 5, 6, 2, 9, 10, 11, 0, 3, 8, 4, 7}));
  for (int64_t q = 0; q < T * K; ++q) {
    EXPECT_EQ(position[sorted[q]], q);
    EXPECT_EQ(permuted[q * H], hidden[(sorted[q] / K) * H]);
  }

  // Combine with weights: out[t] = sum_j w[t, j] rows[position[t, j]].
  std::vector<float> weights = random_vector(T * K, 3), out(T * H);
  flashdelta::MoeUnpermuteArgs u{make_tensor_ref(permuted.data(), DType::kFloat32, {T * K, H}),
                                 make_tensor_ref(weights.data(), DType::kFloat32, {T, K}),
                                 make_tensor_ref(position.data(), DType::kInt32, {T * K}),
                                 make_tensor_ref(out.data(), DType::kFloat32, {T, H})};
  flashdelta::moe_unpermute_forward(u);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double ref = 0.0;
      for (int64_t j = 0; j < K; ++j) ref += weights[t * K + j] * hidden[t * H + h];
      EXPECT_NEAR(out[t * H + h], ref, 1e-5);
    }
  }
}

// ---------------------------------------------------------------------------------- experts

struct ExpertsProblem {
  int64_t N = 9, H = 6, I = 4, E = 3;
  std::vector<float> x, w1, w2;
  std::vector<int32_t> offsets = {0, 4, 4, 8};  // expert 1 empty; row 8 dropped
  ExpertsProblem() {
    x = random_vector(N * H, 4);
    w1 = random_vector(E * 2 * I * H, 5, 0.5f);
    w2 = random_vector(E * H * I, 6, 0.5f);
  }
  flashdelta::MoeExpertsInputs inputs() {
    return {make_tensor_ref(x.data(), DType::kFloat32, {N, H}),
            make_tensor_ref(offsets.data(), DType::kInt32, {E + 1}),
            make_tensor_ref(w1.data(), DType::kFloat32, {E, 2 * I, H}),
            make_tensor_ref(w2.data(), DType::kFloat32, {E, H, I})};
  }
  // sum_r,h c[r,h] * out[r,h] in double.
  double loss(const std::vector<double>& c) const {
    double s = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        std::vector<double> act(I);
        for (int64_t i = 0; i < I; ++i) {
          double g = 0, u = 0;
          for (int64_t h = 0; h < H; ++h) {
            g += double(x[r * H + h]) * w1[(e * 2 * I + i) * H + h];
            u += double(x[r * H + h]) * w1[(e * 2 * I + I + i) * H + h];
          }
          act[i] = g / (1 + std::exp(-g)) * u;
        }
        for (int64_t h = 0; h < H; ++h) {
          double y = 0;
          for (int64_t i = 0; i < I; ++i) y += act[i] * w2[(e * H + h) * I + i];
          s += c[r * H + h] * y;
        }
      }
    }
    return s;
  }
};

TEST(MoeExperts, ForwardAndGradientsAgainstFiniteDifferences) {
  ExpertsProblem p;
  const int64_t N = p.N, H = p.H, I = p.I, E = p.E;
  std::vector<float> out(N * H), gate_up(N * 2 * I), act(N * I);
  const auto in = p.inputs();
  flashdelta::moe_experts_forward(in, {make_tensor_ref(out.data(), DType::kFloat32, {N, H}),
                                       make_tensor_ref(gate_up.data(), DType::kFloat32, {N, 2 * I}),
                                       make_tensor_ref(act.data(), DType::kFloat32, {N, I})});
  std::vector<double> c(N * H);
  for (int64_t i = 0; i < N * H; ++i) {  // out itself: one-hot losses
    std::fill(c.begin(), c.end(), 0.0);
    c[i] = 1.0;
    EXPECT_NEAR(out[i], p.loss(c), 1e-4) << "out " << i;
  }
  for (int64_t h = 0; h < H; ++h) EXPECT_EQ(out[8 * H + h], 0.0f);  // the dropped row

  std::vector<float> d_out = random_vector(N * H, 7);
  for (int64_t i = 0; i < N * H; ++i) c[i] = d_out[i];
  std::vector<float> dx(N * H), dw1(E * 2 * I * H), dw2(E * H * I), d_gu(N * 2 * I), act2(N * I);
  flashdelta::MoeExpertsBackwardArgs b;
  b.d_out = make_tensor_ref(d_out.data(), DType::kFloat32, {N, H});
  b.gate_up = make_tensor_ref(gate_up.data(), DType::kFloat32, {N, 2 * I});
  b.d_hidden = make_tensor_ref(dx.data(), DType::kFloat32, {N, H});
  b.d_gate_up_proj = make_tensor_ref(dw1.data(), DType::kFloat32, {E, 2 * I, H});
  b.d_down_proj = make_tensor_ref(dw2.data(), DType::kFloat32, {E, H, I});
  b.d_gate_up = make_tensor_ref(d_gu.data(), DType::kFloat32, {N, 2 * I});
  b.act = make_tensor_ref(act2.data(), DType::kFloat32, {N, I});
  flashdelta::moe_experts_backward(in, b);

  const double h = 1e-2;
  auto check = [&](std::vector<float>& param, const std::vector<float>& grad, const char* name) {
    for (size_t i = 0; i < param.size(); ++i) {
      const float saved = param[i];
      param[i] = saved + h;
      const double up = p.loss(c);
      param[i] = saved - h;
      const double down = p.loss(c);
      param[i] = saved;
      EXPECT_NEAR(grad[i], (up - down) / (2 * h), 2e-3 * (1 + std::abs(grad[i])))
          << name << "[" << i << "]";
    }
  };
  check(p.x, dx, "d_hidden");
  check(p.w1, dw1, "d_gate_up_proj");
  check(p.w2, dw2, "d_down_proj");
}

TEST(MoeExperts, BadOffsets) {
  ExpertsProblem p;
  p.offsets = {0, 5, 4, 8};
  std::vector<float> out(p.N * p.H), gate_up(p.N * 2 * p.I), act(p.N * p.I);
  EXPECT_THROW(flashdelta::moe_experts_forward(
                   p.inputs(), {make_tensor_ref(out.data(), DType::kFloat32, {p.N, p.H}),
                                make_tensor_ref(gate_up.data(), DType::kFloat32, {p.N, 2 * p.I}),
                                make_tensor_ref(act.data(), DType::kFloat32, {p.N, p.I})}),
               flashdelta::Error);
}

}  // namespace
