// fused_recurrent_gated_delta_rule (the token-by-token decode path) on CPU against the
// double-precision recurrence, and against chunk_gated_delta_rule: both ops compute the same
// function, so in f64 their outputs and gradients must agree to rounding.
#include <cmath>
#include <tuple>

#include "gdn_reference.h"

namespace gdn_test {
namespace {

using CaseParam = std::tuple<size_t, Precision>;

std::string forward_name(const ::testing::TestParamInfo<CaseParam>& info) {
  return forward_cases()[std::get<0>(info.param)].name + "_" +
         precision_name(std::get<1>(info.param));
}

std::string backward_name(const ::testing::TestParamInfo<CaseParam>& info) {
  return backward_cases()[std::get<0>(info.param)].name + "_" +
         precision_name(std::get<1>(info.param));
}

class FusedRecurrentForward : public ::testing::TestWithParam<CaseParam> {};

TEST_P(FusedRecurrentForward, MatchesReference) {
  check_forward(kFusedRecurrentOp, forward_cases()[std::get<0>(GetParam())],
                std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedRecurrentForward,
                         ::testing::Combine(::testing::Range<size_t>(0, forward_cases().size()),
                                            ::testing::Values(Precision::kF64, Precision::kF32,
                                                              Precision::kF16, Precision::kBF16,
                                                              Precision::kBF16GatesF32)),
                         forward_name);

class FusedRecurrentBackward : public ::testing::TestWithParam<CaseParam> {};

TEST_P(FusedRecurrentBackward, MatchesReferenceAndFiniteDifferences) {
  check_backward(kFusedRecurrentOp, backward_cases()[std::get<0>(GetParam())],
                 std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedRecurrentBackward,
                         ::testing::Combine(::testing::Range<size_t>(0, backward_cases().size()),
                                            ::testing::Values(Precision::kF64, Precision::kF32,
                                                              Precision::kBF16GatesF32)),
                         backward_name);

TEST(FusedRecurrentGatedDeltaRule, StridedTensorsGiveContiguousResults) {
  check_strided(kFusedRecurrentOp);
}

TEST(FusedRecurrentGatedDeltaRule, InputsUnchangedAndDeterministic) {
  check_inputs_unchanged_and_deterministic(kFusedRecurrentOp, Precision::kF64);
  check_inputs_unchanged_and_deterministic(kFusedRecurrentOp, Precision::kBF16);
}

TEST(FusedRecurrentGatedDeltaRule, NaNInGivesNaNOut) { check_nan_propagates(kFusedRecurrentOp); }

// Decode: one token at a time, chained through the state, equals one call over all tokens.
TEST(FusedRecurrentGatedDeltaRule, TokenByTokenDecodeEqualsOneCall) {
  ProblemSpec s;
  s.name = "decode";
  s.B = 2, s.T = 5, s.H = 2, s.HV = 4, s.K = 16, s.V = 8;
  s.l2norm = s.initial_state = s.final_state = true;
  s.seed = 91;
  const Problem whole = make_problem(s);
  const ForwardRun all = run_forward(kFusedRecurrentOp, whole, true);
  const std::vector<double> o_all = all.o.values();

  std::vector<double> state = whole.ref.h0;
  ProblemSpec one = s;
  one.T = 1;
  for (int64_t t = 0; t < s.T; ++t) {
    Problem step = make_problem(one);
    // Token t of every batch row, and the state so far.
    auto take = [&](const std::vector<double>& x, int64_t row) {
      std::vector<double> out;
      for (int64_t b = 0; b < s.B; ++b) {
        const int64_t base = (b * s.T + t) * row;
        out.insert(out.end(), x.begin() + base, x.begin() + base + row);
      }
      return out;
    };
    step.q.set_values(take(whole.ref.q, s.H * s.K));
    step.k.set_values(take(whole.ref.k, s.H * s.K));
    step.v.set_values(take(whole.ref.v, s.HV * s.V));
    step.g.set_values(take(whole.ref.g, s.HV));
    step.beta.set_values(take(whole.ref.beta, s.HV));
    step.h0.set_values(state);
    const ForwardRun r = run_forward(kFusedRecurrentOp, step, true);
    const std::vector<double> o = r.o.values();
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t e = 0; e < s.HV * s.V; ++e) {
        const double want = o_all[(b * s.T + t) * s.HV * s.V + e];
        ASSERT_NEAR(o[b * s.HV * s.V + e], want, 1e-12 * (1 + std::abs(want)))
            << "t = " << t << ", b = " << b << ", element " << e;
      }
    }
    state = r.final_state.values();
  }
  EXPECT_TRUE(
      all_close("final state after decoding", state, all.final_state.values(), {1e-12, 1e-12}));
}

// chunk and fused_recurrent give the same outputs and gradients.
class ChunkVsFusedRecurrent : public ::testing::TestWithParam<CaseParam> {};

TEST_P(ChunkVsFusedRecurrent, SameOutputsAndGradients) {
  ProblemSpec spec = backward_cases()[std::get<0>(GetParam())];
  const Precision precision = std::get<1>(GetParam());
  apply_precision(spec, precision);
  const Problem p = make_problem(spec);
  // f64: both are exact up to rounding; lower precisions: both within their tolerance of the
  // reference, so within twice that of each other.
  Tolerance tf = forward_tolerance(precision), tb = backward_tolerance(precision);
  if (precision != Precision::kF64) {
    tf = {2 * tf.rel_l2, 2 * tf.rel_max};
    tb = {2 * tb.rel_l2, 2 * tb.rel_max};
  }
  const ForwardRun fc = run_forward(kChunkOp, p, spec.final_state);
  const ForwardRun ff = run_forward(kFusedRecurrentOp, p, spec.final_state);
  EXPECT_TRUE(all_close("o", fc.o.values(), ff.o.values(), tf));
  if (spec.final_state) {
    EXPECT_TRUE(all_close("final_state", fc.final_state.values(), ff.final_state.values(), tf));
  }
  Rng rng(spec.seed + 100);
  const int64_t N = spec.num_seqs();
  const HostTensor d_o = HostTensor::from_values(
      spec.dtype, {spec.B, spec.T, spec.HV, spec.V},
      random_weights(size_t(spec.B * spec.T * spec.HV * spec.V), rng, spec.dtype));
  HostTensor d_fs;
  if (spec.final_state) {
    d_fs = HostTensor::from_values(
        spec.state_dtype(), {N, spec.HV, spec.K, spec.V},
        random_weights(size_t(N * spec.HV * spec.K * spec.V), rng, spec.state_dtype()));
  }
  const HostTensor* dfs = spec.final_state ? &d_fs : nullptr;
  const BackwardRun bc = run_backward(kChunkOp, p, d_o, dfs);
  const BackwardRun bf = run_backward(kFusedRecurrentOp, p, d_o, dfs);
  RefGrads fused;  // fused_recurrent's gradients, for their overall scale
  fused.dq = bf.dq.values(), fused.dk = bf.dk.values(), fused.dv = bf.dv.values();
  fused.dg = bf.dg.values(), fused.dbeta = bf.dbeta.values();
  if (spec.initial_state) fused.dh0 = bf.dh0.values();
  const double floor = 1e-3 * max_abs_gradient(fused);
  EXPECT_TRUE(all_close("dq", bc.dq.values(), fused.dq, tb, floor));
  EXPECT_TRUE(all_close("dk", bc.dk.values(), fused.dk, tb, floor));
  EXPECT_TRUE(all_close("dv", bc.dv.values(), fused.dv, tb, floor));
  EXPECT_TRUE(all_close("dg", bc.dg.values(), fused.dg, tb, floor));
  EXPECT_TRUE(all_close("dbeta", bc.dbeta.values(), fused.dbeta, tb, floor));
  if (spec.initial_state) {
    EXPECT_TRUE(all_close("d_initial_state", bc.dh0.values(), fused.dh0, tb, floor));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ChunkVsFusedRecurrent,
                         ::testing::Combine(::testing::Range<size_t>(0, backward_cases().size()),
                                            ::testing::Values(Precision::kF64, Precision::kF32)),
                         backward_name);

// Random shapes, flags and varlen splits (random_spec), forward and backward.
class FusedRecurrentRandomShapes : public ::testing::TestWithParam<int> {};

TEST_P(FusedRecurrentRandomShapes, MatchReference) {
  const ProblemSpec spec = random_spec(uint64_t(GetParam()));
  for (Precision precision : {Precision::kF64, Precision::kF32, Precision::kBF16}) {
    SCOPED_TRACE(precision_name(precision));
    check_forward(kFusedRecurrentOp, spec, precision);
  }
  for (Precision precision : {Precision::kF64, Precision::kF32}) {
    SCOPED_TRACE(precision_name(precision));
    check_backward(kFusedRecurrentOp, spec, precision);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, FusedRecurrentRandomShapes, ::testing::Range(0, 24));

}  // namespace
}  // namespace gdn_test
