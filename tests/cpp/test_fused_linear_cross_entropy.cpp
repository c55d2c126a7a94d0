// fused_linear_cross_entropy on the CPU against a float64 reference (full logits, softmax, the
// gradients by hand) with fp32 inputs; chunking changes the result only in its last bits, runs
// repeat bit for bit; bad inputs raise errors naming the argument. (bf16 / fp16 rounding
// semantics are tested against transformers in tests/python/test_fused_linear_cross_entropy.py.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "flashdelta/fused_linear_cross_entropy.h"

namespace {

using flashdelta::DType;
using flashdelta::Error;
using flashdelta::make_tensor_ref;

struct Problem {
  int64_t n, h, v;
  std::vector<float> hidden, weight;  // [N, H], [V, H]
  std::vector<int64_t> target;        // [N]
};

Problem make_problem(int64_t n, int64_t h, int64_t v, uint32_t seed) {
  Problem p{n, h, v, {}, {}, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> cls(0, v - 1);
  for (int64_t i = 0; i < n * h; ++i) p.hidden.push_back(normal(gen));
  for (int64_t i = 0; i < v * h; ++i) p.weight.push_back(normal(gen) / std::sqrt(float(h)));
  for (int64_t i = 0; i < n; ++i) p.target.push_back(i % 4 == 1 ? -100 : cls(gen));
  return p;
}

struct Result {
  double loss_sum = 0, num_valid = 0;
  std::vector<double> d_hidden, d_weight;
};

Result reference(const Problem& p) {
  Result r;
  r.d_hidden.assign(p.n * p.h, 0.0);
  r.d_weight.assign(p.v * p.h, 0.0);
  std::vector<double> z(p.v);
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t t = p.target[i];
    if (t == -100) continue;
    double m = -INFINITY;
    for (int64_t j = 0; j < p.v; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < p.h; ++k) acc += double(p.hidden[i * p.h + k]) * p.weight[j * p.h + k];
      z[j] = acc;
      m = std::max(m, acc);
    }
    double s = 0;
    for (int64_t j = 0; j < p.v; ++j) s += std::exp(z[j] - m);
    const double lse = m + std::log(s);
    r.loss_sum += lse - z[t];
    r.num_valid += 1;
    for (int64_t j = 0; j < p.v; ++j) {
      const double d = std::exp(z[j] - lse) - (j == t ? 1.0 : 0.0);
      for (int64_t k = 0; k < p.h; ++k) {
        r.d_hidden[i * p.h + k] += d * p.weight[j * p.h + k];
        r.d_weight[j * p.h + k] += d * p.hidden[i * p.h + k];
      }
    }
  }
  return r;
}

struct Outputs {
  float loss_sum = 0, num_valid = 0;
  std::vector<float> d_hidden, d_weight;
};

Outputs run_fp32(const Problem& p, int64_t chunk_rows, bool weight_grad) {
  Outputs out;
  out.d_hidden.assign(p.n * p.h, -1.0f);
  out.d_weight.assign(p.v * p.h, -1.0f);
  flashdelta::FusedLinearCrossEntropyInputs in;
  in.hidden = make_tensor_ref(const_cast<float*>(p.hidden.data()), DType::kFloat32, {p.n, p.h});
  in.weight = make_tensor_ref(const_cast<float*>(p.weight.data()), DType::kFloat32, {p.v, p.h});
  in.target = make_tensor_ref(const_cast<int64_t*>(p.target.data()), DType::kInt64, {p.n});
  in.chunk_rows = chunk_rows;
  in.weight_grad = weight_grad;
  std::vector<uint8_t> ws(flashdelta::fused_linear_cross_entropy_workspace_bytes(in));
  flashdelta::FusedLinearCrossEntropyForwardOutputs o;
  o.loss_sum = make_tensor_ref(&out.loss_sum, DType::kFloat32, {1});
  o.num_valid = make_tensor_ref(&out.num_valid, DType::kFloat32, {1});
  o.d_hidden_sum = make_tensor_ref(out.d_hidden.data(), DType::kFloat32, {p.n, p.h});
  if (weight_grad) {
    o.d_weight_sum = make_tensor_ref(out.d_weight.data(), DType::kFloat32, {p.v, p.h});
  }
  if (!ws.empty()) {
    o.workspace = make_tensor_ref(ws.data(), DType::kUInt8, {int64_t(ws.size())});
  }
  flashdelta::fused_linear_cross_entropy_forward(in, o);
  return out;
}

TEST(FusedLinearCrossEntropy, MatchesFloat64ReferenceAndChunkingChangesNothing) {
  const Problem p = make_problem(11, 24, 67, 7);
  const Result want = reference(p);
  const Outputs whole = run_fp32(p, 0, true);
  EXPECT_NEAR(whole.loss_sum, want.loss_sum, 1e-5 * std::abs(want.loss_sum));
  EXPECT_EQ(whole.num_valid, want.num_valid);
  for (size_t e = 0; e < want.d_hidden.size(); ++e) {
    ASSERT_NEAR(whole.d_hidden[e], want.d_hidden[e], 1e-5) << "d_hidden " << e;
  }
  for (size_t e = 0; e < want.d_weight.size(); ++e) {
    ASSERT_NEAR(whole.d_weight[e], want.d_weight[e], 1e-5) << "d_weight " << e;
  }
  for (int64_t chunk : {1, 3, 4, 100}) {
    const Outputs chunked = run_fp32(p, chunk, true);
    // (the GEMM's vector tiles and scalar edges round differently: equal to the last bits)
    EXPECT_NEAR(chunked.loss_sum, whole.loss_sum, 1e-6 * std::abs(whole.loss_sum));
    for (size_t e = 0; e < want.d_hidden.size(); ++e) {
      ASSERT_NEAR(chunked.d_hidden[e], whole.d_hidden[e], 1e-6) << "chunk " << chunk;
    }
    for (size_t e = 0; e < want.d_weight.size(); ++e) {
      ASSERT_NEAR(chunked.d_weight[e], whole.d_weight[e], 1e-6) << "chunk " << chunk;
    }
  }
  const Outputs frozen = run_fp32(p, 0, false);
  EXPECT_EQ(frozen.loss_sum, whole.loss_sum);
  EXPECT_EQ(frozen.d_hidden, whole.d_hidden);
  const Outputs again = run_fp32(p, 3, true);  // run to run: bit for bit
  EXPECT_EQ(again.d_hidden, run_fp32(p, 3, true).d_hidden);
  EXPECT_EQ(again.d_weight, run_fp32(p, 3, true).d_weight);
  EXPECT_EQ(frozen.d_weight, std::vector<float>(p.v * p.h, -1.0f));  // never written
}

TEST(FusedLinearCrossEntropy, AllIgnoredAndEmpty) {
  Problem p = make_problem(5, 8, 13, 3);
  for (auto& t : p.target) t = -100;
  const Outputs r = run_fp32(p, 2, true);
  EXPECT_EQ(r.loss_sum, 0.0f);
  EXPECT_EQ(r.num_valid, 0.0f);
  EXPECT_EQ(r.d_hidden, std::vector<float>(p.n * p.h, 0.0f));
  EXPECT_EQ(r.d_weight, std::vector<float>(p.v * p.h, 0.0f));
  const Problem empty = make_problem(0, 8, 13, 3);
  const Outputs e = run_fp32(empty, 0, true);
  EXPECT_EQ(e.loss_sum, 0.0f);
  EXPECT_EQ(e.d_weight, std::vector<float>(empty.v * empty.h, 0.0f));
}

// A call with one thing wrong raises Error of `kind` whose message contains `part`.
template <typename Fn>
void expect_error(Fn&& fn, Error::Kind kind, const std::string& part) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning " << part;
  } catch (const Error& e) {
    EXPECT_EQ(int(e.kind()), int(kind)) << e.what();
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(FusedLinearCrossEntropy, BadInputsNameTheArgument) {
  Problem p = make_problem(4, 8, 5, 1);
  flashdelta::FusedLinearCrossEntropyInputs in;
  in.hidden = make_tensor_ref(p.hidden.data(), DType::kFloat32, {p.n, p.h});
  in.weight = make_tensor_ref(p.weight.data(), DType::kFloat32, {p.v, p.h});
  in.target = make_tensor_ref(p.target.data(), DType::kInt64, {p.n});
  auto ws_bytes = [&](flashdelta::FusedLinearCrossEntropyInputs x) {
    return [x] { flashdelta::fused_linear_cross_entropy_workspace_bytes(x); };
  };
  auto bad = in;
  bad.weight.dtype = DType::kBFloat16;
  expect_error(ws_bytes(bad), Error::Kind::kType, "weight must have the dtype of hidden");
  bad = in;
  bad.weight = make_tensor_ref(p.weight.data(), DType::kFloat32, {p.h, p.v / 1});
  expect_error(ws_bytes(bad), Error::Kind::kValue, "weight must have shape [V, H]");
  bad = in;
  bad.target = make_tensor_ref(p.target.data(), DType::kInt64, {p.n - 1});
  expect_error(ws_bytes(bad), Error::Kind::kValue, "target must have shape [N]");
  bad = in;
  bad.target.dtype = DType::kFloat32;
  expect_error(ws_bytes(bad), Error::Kind::kType, "target must have dtype");
  bad = in;
  bad.hidden.strides[1] = 2;
  expect_error(ws_bytes(bad), Error::Kind::kValue, "unit stride along H");

  // a target out of range on the CPU: ValueError naming the token, nothing written
  p.target[2] = 5;
  in.target = make_tensor_ref(p.target.data(), DType::kInt64, {p.n});
  std::vector<uint8_t> ws(flashdelta::fused_linear_cross_entropy_workspace_bytes(in));
  float loss_sum = -1, num_valid = -1;
  std::vector<float> dh(p.n * p.h, -1.0f);
  flashdelta::FusedLinearCrossEntropyForwardOutputs o;
  o.loss_sum = make_tensor_ref(&loss_sum, DType::kFloat32, {1});
  o.num_valid = make_tensor_ref(&num_valid, DType::kFloat32, {1});
  o.d_hidden_sum = make_tensor_ref(dh.data(), DType::kFloat32, {p.n, p.h});
  o.workspace = make_tensor_ref(ws.data(), DType::kUInt8, {int64_t(ws.size())});
  expect_error([&] { flashdelta::fused_linear_cross_entropy_forward(in, o); },
               Error::Kind::kValue, "target[2] = 5 is outside [0, V)");
  EXPECT_EQ(loss_sum, -1.0f);
  // too small a workspace
  p.target[2] = 0;
  o.workspace = make_tensor_ref(ws.data(), DType::kUInt8, {int64_t(ws.size()) - 1});
  expect_error([&] { flashdelta::fused_linear_cross_entropy_forward(in, o); },
               Error::Kind::kValue, "workspace must hold at least");
}

TEST(FusedLinearCrossEntropy, BackwardScalesInPlaceOrIntoASeparateBuffer) {
  const int64_t n = 3, h = 4, v = 5;
  std::vector<float> dh_sum(n * h), dw_sum(v * h);
  for (size_t e = 0; e < dh_sum.size(); ++e) dh_sum[e] = 0.25f * float(e) - 1.0f;
  for (size_t e = 0; e < dw_sum.size(); ++e) dw_sum[e] = 0.5f * float(e) - 3.0f;
  float scale = -2.0f;
  std::vector<float> dh(n * h, 7.0f), dw_separate(v * h, 7.0f), in_place = dw_sum;
  flashdelta::FusedLinearCrossEntropyBackwardArgs a;
  a.grad_scale = make_tensor_ref(&scale, DType::kFloat32, {1});
  a.d_hidden_sum = make_tensor_ref(dh_sum.data(), DType::kFloat32, {n, h});
  a.d_hidden = make_tensor_ref(dh.data(), DType::kFloat32, {n, h});
  a.d_weight_sum = make_tensor_ref(dw_sum.data(), DType::kFloat32, {v, h});
  a.d_weight = make_tensor_ref(dw_separate.data(), DType::kFloat32, {v, h});
  const std::vector<float> dw_sum_before = dw_sum;
  flashdelta::fused_linear_cross_entropy_backward(a);  // separate buffer: the sum is unchanged
  EXPECT_EQ(dw_sum, dw_sum_before);
  for (size_t e = 0; e < dh.size(); ++e) EXPECT_EQ(dh[e], -2.0f * dh_sum[e]);
  for (size_t e = 0; e < dw_separate.size(); ++e) EXPECT_EQ(dw_separate[e], -2.0f * dw_sum[e]);

  a.d_weight_sum = make_tensor_ref(in_place.data(), DType::kFloat32, {v, h});
  a.d_weight = a.d_weight_sum;  // in place
  flashdelta::fused_linear_cross_entropy_backward(a);
  EXPECT_EQ(in_place, dw_separate);

  // a partial overlap would read elements already scaled
  std::vector<float> big(v * h + 1, 1.0f);
  a.d_weight_sum = make_tensor_ref(big.data(), DType::kFloat32, {v, h});
  a.d_weight = make_tensor_ref(big.data() + 1, DType::kFloat32, {v, h});
  expect_error([&] { flashdelta::fused_linear_cross_entropy_backward(a); }, Error::Kind::kValue,
               "d_weight must be d_weight_sum itself (in place) or not overlap it");
}

}  // namespace
