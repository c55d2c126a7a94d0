// causal_conv1d (CPU) against a naive double-precision convolution written from the definition
// (each token looks up its sequence id), the backward against central finite differences, the
// decode update against the full convolution, and the argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "flashdelta/causal_conv1d.h"

namespace {

using flashdelta::DType;
using flashdelta::Error;
using flashdelta::TensorRef;

struct Problem {
  int64_t B, C, T, W;
  std::vector<int64_t> offsets;  // empty: not varlen
  bool silu, bias;
};

std::vector<double> random_vector(size_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// x is stored [B, T, C] and viewed as [B, C, T] (the layout transformers passes).
TensorRef channels_last_view(double* data, int64_t B, int64_t C, int64_t T) {
  TensorRef t = flashdelta::make_tensor_ref(data, DType::kFloat64, {B, C, T});
  t.strides[0] = T * C;
  t.strides[1] = 1;
  t.strides[2] = C;
  return t;
}

struct Data {
  Problem p;
  std::vector<double> x, w, b;  // x as [B, T, C]
  std::vector<int64_t> cu;

  explicit Data(const Problem& pr) : p(pr), cu(pr.offsets) {
    x = random_vector(p.B * p.T * p.C, 1, 2.0);
    w = random_vector(p.C * p.W, 2, 0.5);
    b = random_vector(p.C, 3, 0.1);
  }
  double& xat(int64_t b_, int64_t c, int64_t t) { return x[(b_ * p.T + t) * p.C + c]; }

  flashdelta::CausalConv1dInputs inputs() {
    flashdelta::CausalConv1dInputs in;
    in.x = channels_last_view(x.data(), p.B, p.C, p.T);
    in.weight = flashdelta::make_tensor_ref(w.data(), DType::kFloat64, {p.C, p.W});
    if (p.bias) in.bias = flashdelta::make_tensor_ref(b.data(), DType::kFloat64, {p.C});
    if (!cu.empty()) {
      in.cu_seqlens = flashdelta::make_tensor_ref(cu.data(), DType::kInt64,
                                                  {static_cast<int64_t>(cu.size())});
    }
    in.silu = p.silu;
    return in;
  }

  int64_t sequence_of(int64_t t) const {
    int64_t n = 0;
    for (size_t i = 1; i < cu.size(); ++i)
      if (cu[i] <= t) n = static_cast<int64_t>(i);
    return n;
  }

  // y[b, c, t] from the definition, stored [B, T, C].
  std::vector<double> reference() {
    std::vector<double> y(x.size());
    for (int64_t b_ = 0; b_ < p.B; ++b_)
      for (int64_t c = 0; c < p.C; ++c)
        for (int64_t t = 0; t < p.T; ++t) {
          double acc = p.bias ? b[c] : 0.0;
          for (int64_t k = 0; k < p.W; ++k) {
            const int64_t src = t - (p.W - 1) + k;
            if (src < 0 || sequence_of(src) != sequence_of(t)) continue;
            acc += w[c * p.W + k] * xat(b_, c, src);
          }
          y[(b_ * p.T + t) * p.C + c] = p.silu ? acc / (1.0 + std::exp(-acc)) : acc;
        }
    return y;
  }

  std::vector<double> forward() {
    std::vector<double> y(x.size());
    flashdelta::CausalConv1dForwardOutputs out;
    out.y = channels_last_view(y.data(), p.B, p.C, p.T);
    flashdelta::causal_conv1d_forward(inputs(), out);
    return y;
  }
};

const Problem kProblems[] = {
    {2, 5, 11, 4, {}, true, true},
    {1, 3, 17, 4, {0, 3, 3, 4, 10, 17}, true, true},
    {2, 4, 9, 3, {}, false, false},
    {1, 6, 13, 2, {0, 7, 13}, true, false},
    {1, 2, 8, 6, {0, 2, 8}, true, true},  // any W on the CPU
};

TEST(CausalConv1d, ForwardMatchesDefinition) {
  for (const Problem& pr : kProblems) {
    Data d(pr);
    const auto want = d.reference();
    const auto got = d.forward();
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-12) << i;
  }
}

TEST(CausalConv1d, BackwardMatchesFiniteDifferences) {
  for (const Problem& pr : kProblems) {
    Data d(pr);
    const auto dy = random_vector(d.x.size(), 4);
    std::vector<double> dx(d.x.size()), dw(d.w.size()), db(d.b.size());
    flashdelta::CausalConv1dBackwardInputs gin;
    gin.dy = channels_last_view(const_cast<double*>(dy.data()), pr.B, pr.C, pr.T);
    flashdelta::CausalConv1dBackwardOutputs gout;
    gout.dx = channels_last_view(dx.data(), pr.B, pr.C, pr.T);
    gout.dweight = flashdelta::make_tensor_ref(dw.data(), DType::kFloat64, {pr.C, pr.W});
    if (pr.bias) gout.dbias = flashdelta::make_tensor_ref(db.data(), DType::kFloat64, {pr.C});
    // The CPU backward's per-worker row scratch (inputs, dpre, sequence starts: 24 bytes a token)
    std::vector<unsigned char> workspace(
        flashdelta::causal_conv1d_backward_workspace_bytes(d.inputs()));
    ASSERT_GE(workspace.size(), static_cast<size_t>(24 * pr.T));
    gout.workspace = flashdelta::make_tensor_ref(workspace.data(), DType::kUInt8,
                                                 {static_cast<int64_t>(workspace.size())});
    flashdelta::causal_conv1d_backward(d.inputs(), gin, gout);

    auto loss = [&] {
      const auto y = d.reference();
      double s = 0.0;
      for (size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
      return s;
    };
    auto check = [&](std::vector<double>& param, const std::vector<double>& grad,
                     const char* name) {
      for (size_t i = 0; i < param.size(); ++i) {
        const double keep = param[i], h = 1e-6;
        param[i] = keep + h;
        const double up = loss();
        param[i] = keep - h;
        const double down = loss();
        param[i] = keep;
        ASSERT_NEAR(grad[i], (up - down) / (2 * h), 1e-6) << name << "[" << i << "]";
      }
    };
    check(d.x, dx, "dx");
    check(d.w, dw, "dweight");
    if (pr.bias) check(d.b, db, "dbias");
  }
}

TEST(CausalConv1d, Float32WithinOneMillionth) {
  Data d({2, 8, 33, 4, {}, true, true});
  std::vector<float> x32(d.x.begin(), d.x.end()), w32(d.w.begin(), d.w.end()),
      b32(d.b.begin(), d.b.end()), y32(d.x.size());
  flashdelta::CausalConv1dInputs in;
  in.x = flashdelta::make_tensor_ref(x32.data(), DType::kFloat32, {2, 33, 8});
  std::swap(in.x.shape[1], in.x.shape[2]);
  std::swap(in.x.strides[1], in.x.strides[2]);
  in.weight = flashdelta::make_tensor_ref(w32.data(), DType::kFloat32, {8, 4});
  in.bias = flashdelta::make_tensor_ref(b32.data(), DType::kFloat32, {8});
  in.silu = true;
  for (size_t i = 0; i < d.x.size(); ++i) d.x[i] = x32[i];
  for (size_t i = 0; i < d.w.size(); ++i) d.w[i] = w32[i];
  for (size_t i = 0; i < d.b.size(); ++i) d.b[i] = b32[i];
  flashdelta::CausalConv1dForwardOutputs out;
  out.y = in.x;
  out.y.data = y32.data();
  flashdelta::causal_conv1d_forward(in, out);
  const auto want = d.reference();
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(y32[i], want[i], 1e-6 * std::max(1.0, std::abs(want[i]))) << i;
}

TEST(CausalConv1d, UpdateContinuesTheConvolution) {
  const int64_t B = 2, C = 3, T = 10, W = 4, S = 5, prefill = 6;
  Data d({B, C, T, W, {}, true, true});
  const auto full = d.reference();  // [B, T, C]
  // conv_state [B, C, S]: the last S inputs of the prefill (zeros before t = 0)
  std::vector<double> state(B * C * S, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < S; ++i) {
        const int64_t t = prefill - S + i;
        state[(b * C + c) * S + i] = t >= 0 ? d.xat(b, c, t) : 0.0;
      }
  for (int64_t t = prefill; t < T; ++t) {
    std::vector<double> xt(B * C), yt(B * C);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) xt[b * C + c] = d.xat(b, c, t);
    flashdelta::CausalConv1dUpdateArgs a;
    a.x = flashdelta::make_tensor_ref(xt.data(), DType::kFloat64, {B, C, 1});
    a.conv_state = flashdelta::make_tensor_ref(state.data(), DType::kFloat64, {B, C, S});
    a.weight = flashdelta::make_tensor_ref(d.w.data(), DType::kFloat64, {C, W});
    a.bias = flashdelta::make_tensor_ref(d.b.data(), DType::kFloat64, {C});
    a.y = flashdelta::make_tensor_ref(yt.data(), DType::kFloat64, {B, C, 1});
    a.silu = true;
    flashdelta::causal_conv1d_update(a);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        ASSERT_NEAR(yt[b * C + c], full[(b * T + t) * C + c], 1e-12) << t;
        ASSERT_EQ(state[(b * C + c) * S + S - 1], d.xat(b, c, t));
      }
  }
}

template <typename Fn>
void expect_error(Error::Kind kind, const char* needle, Fn&& fn) {
  try {
    fn();
    FAIL() << "no error; expected one mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(CausalConv1d, BadArguments) {
  Data d({1, 4, 6, 4, {0, 2, 6}, true, true});
  std::vector<double> y(d.x.size());
  flashdelta::CausalConv1dForwardOutputs out;
  out.y = channels_last_view(y.data(), 1, 4, 6);
  auto run = [&](flashdelta::CausalConv1dInputs in) { flashdelta::causal_conv1d_forward(in, out); };
  {
    auto in = d.inputs();
    in.weight.shape[0] = 3;
    expect_error(Error::Kind::kValue, "weight", [&] { run(in); });
  }
  {
    auto in = d.inputs();
    in.bias.dtype = DType::kFloat32;
    expect_error(Error::Kind::kType, "bias", [&] { run(in); });
  }
  {
    auto in = d.inputs();
    d.cu[1] = 7;
    expect_error(Error::Kind::kValue, "cu_seqlens", [&] { run(in); });
    d.cu[1] = 2;
  }
  {
    auto in = d.inputs();
    in.x.dtype = DType::kInt32;
    expect_error(Error::Kind::kType, "x must have dtype", [&] { run(in); });
  }
  {
    auto in = d.inputs();
    in.weight.device = {flashdelta::DeviceType::kCUDA, 0};
    expect_error(Error::Kind::kValue, "weight is on cuda", [&] { run(in); });
  }
  {
    auto in = d.inputs();
    auto bad = out;
    bad.y.shape[2] = 5;
    expect_error(Error::Kind::kValue, "y must have shape",
                 [&] { flashdelta::causal_conv1d_forward(in, bad); });
  }
  {  // backward: dbias exactly when bias
    auto in = d.inputs();
    std::vector<double> dx(d.x.size()), dw(d.w.size());
    flashdelta::CausalConv1dBackwardInputs gin;
    gin.dy = out.y;
    flashdelta::CausalConv1dBackwardOutputs gout;
    gout.dx = channels_last_view(dx.data(), 1, 4, 6);
    gout.dweight = flashdelta::make_tensor_ref(dw.data(), DType::kFloat64, {4, 4});
    expect_error(Error::Kind::kValue, "dbias",
                 [&] { flashdelta::causal_conv1d_backward(in, gin, gout); });
  }
}

}  // namespace
