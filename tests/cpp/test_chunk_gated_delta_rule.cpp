// chunk_gated_delta_rule on CPU against the double-precision per-token recurrence
// (gdn_reference.h): forward in f64 / f32 / f16 / bf16, backward against the reference backward
// and, in f64, against finite differences; strided tensors, untouched inputs, determinism, NaN.
#include <tuple>

#include "gdn_reference.h"

namespace gdn_test {
namespace {

using ForwardParam = std::tuple<size_t, Precision>;

std::string forward_name(const ::testing::TestParamInfo<ForwardParam>& info) {
  return forward_cases()[std::get<0>(info.param)].name + "_" +
         precision_name(std::get<1>(info.param));
}

std::string backward_name(const ::testing::TestParamInfo<ForwardParam>& info) {
  return backward_cases()[std::get<0>(info.param)].name + "_" +
         precision_name(std::get<1>(info.param));
}

class ChunkForward : public ::testing::TestWithParam<ForwardParam> {};

TEST_P(ChunkForward, MatchesReference) {
  check_forward(kChunkOp, forward_cases()[std::get<0>(GetParam())], std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Cases, ChunkForward,
                         ::testing::Combine(::testing::Range<size_t>(0, forward_cases().size()),
                                            ::testing::Values(Precision::kF64, Precision::kF32,
                                                              Precision::kF16, Precision::kBF16,
                                                              Precision::kBF16GatesF32)),
                         forward_name);

class ChunkBackward : public ::testing::TestWithParam<ForwardParam> {};

TEST_P(ChunkBackward, MatchesReferenceAndFiniteDifferences) {
  check_backward(kChunkOp, backward_cases()[std::get<0>(GetParam())], std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(Cases, ChunkBackward,
                         ::testing::Combine(::testing::Range<size_t>(0, backward_cases().size()),
                                            ::testing::Values(Precision::kF64, Precision::kF32,
                                                              Precision::kF16,
                                                              Precision::kBF16GatesF32)),
                         backward_name);

TEST(ChunkGatedDeltaRule, StridedTensorsGiveContiguousResults) { check_strided(kChunkOp); }

TEST(ChunkGatedDeltaRule, InputsUnchangedAndDeterministic) {
  check_inputs_unchanged_and_deterministic(kChunkOp, Precision::kF64);
  check_inputs_unchanged_and_deterministic(kChunkOp, Precision::kF32);
  check_inputs_unchanged_and_deterministic(kChunkOp, Precision::kBF16);
}

TEST(ChunkGatedDeltaRule, NaNInGivesNaNOut) { check_nan_propagates(kChunkOp); }

// The benchmark's head sizes (K = V = 128, H = 2, HV = 4, l2norm, realistic gates) over three
// chunks with a ragged end, in f32 and bf16.
TEST(ChunkGatedDeltaRule, BenchmarkHeadSizes) {
  ProblemSpec s;
  s.name = "bench_heads";
  s.B = 1, s.T = 3 * 64 + 9, s.H = 2, s.HV = 4, s.K = 128, s.V = 128;
  s.l2norm = s.initial_state = s.final_state = true;
  s.seed = 81;
  check_forward(kChunkOp, s, Precision::kF32);
  check_forward(kChunkOp, s, Precision::kBF16GatesF32);
  s.T = 70, s.H = 1, s.HV = 2;
  check_backward(kChunkOp, s, Precision::kF32);
}

// Decays far beyond what exp(-sum g) over a chunk can represent (sum of 64 gates of -30 is
// -1920): a chunked kernel that divides by exp(cumsum g) overflows here.
TEST(ChunkGatedDeltaRule, StrongDecayStaysFinite) {
  for (Precision precision : {Precision::kF64, Precision::kF32, Precision::kBF16}) {
    SCOPED_TRACE(precision_name(precision));
    ProblemSpec s;
    s.name = "strong";
    s.B = 1, s.T = 150, s.H = 1, s.HV = 2, s.K = 16, s.V = 16;
    s.gate = Gate::kStrong;
    s.l2norm = s.initial_state = s.final_state = true;
    s.seed = 82;
    check_forward(kChunkOp, s, precision);
    s.T = 100;
    check_backward(kChunkOp, s,
                   precision == Precision::kBF16 ? Precision::kBF16GatesF32 : precision);
  }
}

// T = 0 (and only empty sequences): o is empty, final_state = initial_state and
// d_initial_state = d_final_state.
TEST(ChunkGatedDeltaRule, EmptyInput) {
  for (bool varlen : {false, true}) {
    SCOPED_TRACE(varlen ? "varlen" : "batched");
    ProblemSpec s;
    s.name = "empty";
    s.B = varlen ? 1 : 2, s.T = 0, s.H = 1, s.HV = 2, s.K = 8, s.V = 4;
    if (varlen) s.cu_seqlens = {0, 0, 0};
    s.initial_state = s.final_state = true;
    const Problem p = make_problem(s);
    const ForwardRun f = run_forward(kChunkOp, p, true);
    EXPECT_EQ(f.final_state.values(), p.ref.h0);
    Rng rng(1);
    const int64_t N = s.num_seqs();
    const std::vector<double> w = random_weights(size_t(N * s.HV * s.K * s.V), rng, s.dtype);
    const HostTensor d_o(s.dtype, {s.B, 0, s.HV, s.V});
    const HostTensor d_fs = HostTensor::from_values(s.dtype, {N, s.HV, s.K, s.V}, w);
    const BackwardRun b = run_backward(kChunkOp, p, d_o, &d_fs);
    EXPECT_EQ(b.dh0.values(), w);
  }
}

// Random shapes, flags and varlen splits (random_spec), forward and backward.
class ChunkRandomShapes : public ::testing::TestWithParam<int> {};

TEST_P(ChunkRandomShapes, MatchReference) {
  const ProblemSpec spec = random_spec(uint64_t(GetParam()));
  for (Precision precision : {Precision::kF64, Precision::kF32, Precision::kBF16}) {
    SCOPED_TRACE(precision_name(precision));
    check_forward(kChunkOp, spec, precision);
  }
  for (Precision precision : {Precision::kF64, Precision::kF32}) {
    SCOPED_TRACE(precision_name(precision));
    check_backward(kChunkOp, spec, precision);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, ChunkRandomShapes, ::testing::Range(0, 24));

}  // namespace
}  // namespace gdn_test
