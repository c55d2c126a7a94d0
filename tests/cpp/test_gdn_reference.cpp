// Tests of the test support itself (gdn_reference.h): the conversions, the buffers, and the
// double-precision reference, whose backward is checked here against finite differences on
// every element, so that it can serve as the ground truth for the ops' gradients.
#include <cmath>
#include <cstring>
#include <limits>

#include "gdn_reference.h"

namespace gdn_test {
namespace {

TEST(GdnReference, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16_bits(-2.0f), 0xC000);
  auto from_bits = [](uint32_t b) {
    float x;
    std::memcpy(&x, &b, 4);
    return x;
  };
  EXPECT_EQ(float_to_bf16_bits(from_bits(0x3F808000u)), 0x3F80);  // tie, even below
  EXPECT_EQ(float_to_bf16_bits(from_bits(0x3F818000u)), 0x3F82);  // tie, even above
  EXPECT_EQ(float_to_bf16_bits(from_bits(0x3F808001u)), 0x3F81);  // above the tie
  EXPECT_EQ(float_to_bf16_bits(from_bits(0x3F807FFFu)), 0x3F80);  // below the tie
  EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::nanf("")))));
  EXPECT_TRUE(std::isinf(bf16_bits_to_float(float_to_bf16_bits(3.4e38f))));  // rounds up to inf
  EXPECT_EQ(bf16_bits_to_float(0x4049), 3.140625f);
}

TEST(GdnReference, Float16Conversions) {
  EXPECT_EQ(float_to_fp16_bits(1.0f), 0x3C00);
  EXPECT_EQ(float_to_fp16_bits(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_fp16_bits(-0.5f), 0xB800);
  EXPECT_EQ(fp16_bits_to_float(0x0001), std::ldexp(1.0f, -24));         // smallest subnormal
  EXPECT_EQ(float_to_fp16_bits(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie to even
  EXPECT_EQ(round_to(0.1, DType::kFloat16), double(fp16_bits_to_float(0x2E66)));
}

TEST(GdnReference, HostTensorLayouts) {
  std::vector<double> x(2 * 3 * 4);
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(i);
  Layout padded;
  padded.pad = {0, 1, 2};
  Layout permuted;
  permuted.order = {2, 0, 1};
  for (DType dt : {DType::kFloat64, DType::kFloat32, DType::kBFloat16, DType::kInt32}) {
    const HostTensor a = HostTensor::from_values(dt, {2, 3, 4}, x, padded);
    EXPECT_EQ(a.values(), x);
    EXPECT_EQ(a.strides(), (std::vector<int64_t>{24, 6, 1}));
    EXPECT_FALSE(a.ref().is_contiguous());
    EXPECT_TRUE(a.padding_untouched());
    const HostTensor b = HostTensor::from_values(dt, {2, 3, 4}, x, permuted);
    EXPECT_EQ(b.values(), x);
    EXPECT_EQ(b.strides(), (std::vector<int64_t>{3, 1, 6}));
    const HostTensor c = HostTensor::from_values(dt, {2, 3, 4}, x);
    EXPECT_TRUE(c.ref().is_contiguous());
  }
  const HostTensor poisoned(DType::kFloat32, {3});
  for (double e : poisoned.values()) EXPECT_TRUE(std::isnan(e));
}

// The recurrence as DESIGN.md writes it: S_t = exp(g) (I - b k k^T) S_{t-1} + b k v^T, with
// explicit matrices, on a grouped, varlen problem.
TEST(GdnReference, ForwardMatchesMatrixForm) {
  ProblemSpec s;
  s.B = 1, s.T = 9, s.H = 2, s.HV = 4, s.K = 5, s.V = 3;
  s.cu_seqlens = {0, 4, 4, 9};
  s.l2norm = s.initial_state = s.final_state = true;
  const Problem p = make_problem(s);
  const RefProblem& r = p.ref;
  const RefOutputs out = reference_forward(r);
  const int64_t K = s.K, V = s.V;
  for (int64_t n = 0; n < 3; ++n) {
    for (int64_t hv = 0; hv < s.HV; ++hv) {
      const int64_t hk = hv / 2;
      std::vector<double> S(r.h0.begin() + (n * s.HV + hv) * K * V,
                            r.h0.begin() + (n * s.HV + hv + 1) * K * V);
      for (int64_t t = s.cu_seqlens[n]; t < s.cu_seqlens[n + 1]; ++t) {
        std::vector<double> q(K), k(K);
        double nq = 0, nk = 0;
        for (int64_t i = 0; i < K; ++i) {
          q[i] = r.q[(t * s.H + hk) * K + i];
          k[i] = r.k[(t * s.H + hk) * K + i];
          nq += q[i] * q[i];
          nk += k[i] * k[i];
        }
        for (int64_t i = 0; i < K; ++i) {
          q[i] /= std::sqrt(nq + 1e-6);
          k[i] /= std::sqrt(nk + 1e-6);
        }
        const double a = std::exp(r.g[t * s.HV + hv]), b = r.beta[t * s.HV + hv];
        std::vector<double> next(K * V, 0.0);
        for (int64_t i = 0; i < K; ++i) {
          for (int64_t j = 0; j < V; ++j) {
            double acc = 0;
            for (int64_t l = 0; l < K; ++l) {
              acc += ((i == l ? 1.0 : 0.0) - b * k[i] * k[l]) * S[l * V + j];
            }
            next[i * V + j] = a * acc + b * k[i] * r.v[(t * s.HV + hv) * V + j];
          }
        }
        S = next;
        for (int64_t j = 0; j < V; ++j) {
          double o = 0;
          for (int64_t i = 0; i < K; ++i) o += S[i * V + j] * q[i];
          EXPECT_NEAR(out.o[(t * s.HV + hv) * V + j], r.scale * o, 1e-13);
        }
      }
      for (int64_t e = 0; e < K * V; ++e) {
        EXPECT_NEAR(out.final_state[(n * s.HV + hv) * K * V + e], S[e], 1e-13);
      }
    }
  }
}

// Every element of every gradient of the reference against finite differences.
TEST(GdnReference, BackwardMatchesFiniteDifferences) {
  for (int variant = 0; variant < 3; ++variant) {
    ProblemSpec s;
    s.B = variant == 1 ? 1 : 2, s.T = variant == 1 ? 12 : 7, s.H = 1, s.HV = 2, s.K = 4, s.V = 3;
    if (variant == 1) s.cu_seqlens = {0, 0, 1, 7, 7, 12};
    s.l2norm = variant != 2;
    s.initial_state = variant != 2;
    s.final_state = true;
    s.gate = variant == 2 ? Gate::kRealistic : Gate::kMild;
    s.seed = 100 + variant;
    SCOPED_TRACE("variant " + std::to_string(variant));
    const Problem p = make_problem(s);
    Rng rng(7);
    const std::vector<double> w_o = random_weights(p.ref.v.size(), rng, DType::kFloat64);
    const std::vector<double> w_s =
        random_weights(size_t(s.num_seqs() * s.HV * s.K * s.V), rng, DType::kFloat64);
    const RefGrads g = reference_backward(p.ref, w_o, &w_s);
    const double gs = max_abs_gradient(g);
    const int all = 1 << 30;
    EXPECT_TRUE(
        matches_fd("dq", g.dq, finite_differences(p.ref, &RefProblem::q, w_o, &w_s, all, rng), gs));
    EXPECT_TRUE(
        matches_fd("dk", g.dk, finite_differences(p.ref, &RefProblem::k, w_o, &w_s, all, rng), gs));
    EXPECT_TRUE(
        matches_fd("dv", g.dv, finite_differences(p.ref, &RefProblem::v, w_o, &w_s, all, rng), gs));
    EXPECT_TRUE(
        matches_fd("dg", g.dg, finite_differences(p.ref, &RefProblem::g, w_o, &w_s, all, rng), gs));
    EXPECT_TRUE(matches_fd("dbeta", g.dbeta,
                           finite_differences(p.ref, &RefProblem::beta, w_o, &w_s, all, rng), gs));
    if (s.initial_state) {
      EXPECT_TRUE(matches_fd("dh0", g.dh0,
                             finite_differences(p.ref, &RefProblem::h0, w_o, &w_s, all, rng), gs));
    }
  }
}

// The finite differences themselves are accurate well below the 1e-6 / 1e-8 the ops are held to:
// measured on every backward case against the reference backward.
TEST(GdnReference, FiniteDifferencesAccurateOnBackwardCases) {
  for (const ProblemSpec& spec : backward_cases()) {
    SCOPED_TRACE(spec.name);
    const Problem p = make_problem(spec);
    Rng rng(spec.seed);
    const std::vector<double> w_o = random_weights(p.ref.v.size(), rng, DType::kFloat64);
    const bool with_ds = spec.final_state && spec.d_final_state;
    std::vector<double> w_s;
    if (with_ds) {
      w_s =
          random_weights(size_t(spec.num_seqs() * spec.HV * spec.K * spec.V), rng, DType::kFloat64);
    }
    const std::vector<double>* ws = with_ds ? &w_s : nullptr;
    const RefGrads g = reference_backward(p.ref, w_o, ws);
    EXPECT_TRUE(matches_fd("dg", g.dg, finite_differences(p.ref, &RefProblem::g, w_o, ws, 10, rng),
                           max_abs_gradient(g), 1e-7, 1e-9));
    EXPECT_TRUE(matches_fd("dk", g.dk, finite_differences(p.ref, &RefProblem::k, w_o, ws, 10, rng),
                           max_abs_gradient(g), 1e-7, 1e-9));
  }
}

}  // namespace
}  // namespace gdn_test
