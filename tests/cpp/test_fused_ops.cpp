// The fused layer ops on the CPU (rms_norm, rms_norm_gated, swiglu, attention_gate,
// partial_rotary_embedding) against double-precision references written from the formulas in
// their headers: forward, backward (analytic gradients in double, and for the rotation the adjoint
// identity <rope(x), y> = <x, rope^T(y)>), strided rows, determinism, and argument errors.
// (The Python tests hold the ops to transformers' own modules, roundings included.)
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "flashdelta/gated_product.h"
#include "flashdelta/partial_rotary_embedding.h"
#include "flashdelta/rms_norm.h"

namespace {

using flashdelta::DType;
using flashdelta::Error;
using flashdelta::TensorRef;

std::vector<float> randn(size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

TensorRef ref(std::vector<float>& v, std::initializer_list<int64_t> shape) {
  return flashdelta::make_tensor_ref(v.data(), DType::kFloat32, shape);
}

// [R, D] rows of a buffer with row stride `stride` (>= D).
TensorRef rows(std::vector<float>& v, int64_t R, int64_t D, int64_t stride) {
  TensorRef t = flashdelta::make_tensor_ref(v.data(), DType::kFloat32, {R, D});
  t.strides[0] = stride;
  return t;
}

double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double scale = 1e-30, err = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) err = std::max(err, std::abs(got[i] - want[i]));
  return err / scale;
}

double silu(double z) { return z / (1 + std::exp(-z)); }
double sigmoid(double z) { return 1 / (1 + std::exp(-z)); }

class RmsNorm : public ::testing::TestWithParam<bool> {};  // gated?

TEST_P(RmsNorm, ForwardBackwardMatchDoubleReference) {
  const bool gated = GetParam();
  const int64_t R = 37, D = 24, stride = 40;  // strided rows: a per-head view
  auto x = randn(R * stride, 1), z = randn(R * stride, 2, 2.f), w = randn(D, 3, 0.5f);
  auto dy = randn(R * D, 4);
  x[0] *= 1000.f;  // a large value in the first row
  std::vector<float> y(R * D), rstd(R), dx(R * D), dz(R * D);
  flashdelta::RmsNormInputs in;
  in.x = rows(x, R, D, stride);
  if (gated) in.gate = rows(z, R, D, stride);
  in.weight = ref(w, {D});
  in.eps = 1e-6;
  flashdelta::RmsNormForwardOutputs out{ref(y, {R, D}), ref(rstd, {R})};
  (gated ? flashdelta::rms_norm_gated_forward : flashdelta::rms_norm_forward)(in, out);
  const size_t ws_bytes = (gated ? flashdelta::rms_norm_gated_backward_workspace_bytes
                                 : flashdelta::rms_norm_backward_workspace_bytes)(in);
  std::vector<uint8_t> ws(ws_bytes);
  flashdelta::RmsNormBackwardArgs a;
  a.rstd = ref(rstd, {R});
  a.dy = ref(dy, {R, D});
  a.dx = ref(dx, {R, D});
  if (gated) a.dgate = ref(dz, {R, D});
  std::vector<float> dweight(D);
  a.dweight = ref(dweight, {D});
  a.workspace = flashdelta::make_tensor_ref(ws.data(), DType::kUInt8,
                                            {static_cast<int64_t>(ws_bytes)});
  (gated ? flashdelta::rms_norm_gated_backward : flashdelta::rms_norm_backward)(in, a);

  std::vector<double> y_ref(R * D), dx_ref(R * D), dz_ref(R * D), dw_ref(D, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = &x[r * stride];
    const float* zr = &z[r * stride];
    double ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += double(xr[j]) * xr[j];
    const double rs = 1 / std::sqrt(ss / D + 1e-6);
    double dot = 0;
    std::vector<double> dn(D);
    for (int64_t j = 0; j < D; ++j) {
      const double n = xr[j] * rs, g = dy[r * D + j];
      if (gated) {
        const double s = silu(zr[j]), sg = sigmoid(zr[j]);
        y_ref[r * D + j] = w[j] * n * s;
        dz_ref[r * D + j] = g * w[j] * n * sg * (1 + zr[j] * (1 - sg));
        dn[j] = g * s * w[j];
        dw_ref[j] += g * s * n;
      } else {
        y_ref[r * D + j] = n * (1 + w[j]);
        dn[j] = g * (1 + w[j]);
        dw_ref[j] += g * n;
      }
      dot += dn[j] * n;
    }
    for (int64_t j = 0; j < D; ++j) dx_ref[r * D + j] = rs * (dn[j] - xr[j] * rs * dot / D);
  }
  EXPECT_LT(max_rel_err(y, y_ref), 1e-6);
  EXPECT_LT(max_rel_err(dx, dx_ref), 1e-5);
  EXPECT_LT(max_rel_err(dweight, dw_ref), 1e-5);
  if (gated) EXPECT_LT(max_rel_err(dz, dz_ref), 1e-5);

  // deterministic: a second backward gives the same bits
  std::vector<float> dweight2(D), dx2(R * D);
  a.dweight = ref(dweight2, {D});
  a.dx = ref(dx2, {R, D});
  (gated ? flashdelta::rms_norm_gated_backward : flashdelta::rms_norm_backward)(in, a);
  EXPECT_EQ(dweight, dweight2);
  EXPECT_EQ(dx, dx2);
}

INSTANTIATE_TEST_SUITE_P(Ops, RmsNorm, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Gated" : "Plain"; });

TEST(RmsNormChecks, BadArgumentsNameTheArgument) {
  std::vector<float> x(12), w(4), y(12), rstd(3), w5(5);
  flashdelta::RmsNormInputs in;
  in.x = ref(x, {3, 4});
  in.weight = ref(w5, {5});
  flashdelta::RmsNormForwardOutputs out{ref(y, {3, 4}), ref(rstd, {3})};
  try {
    flashdelta::rms_norm_forward(in, out);
    FAIL() << "did not raise";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), Error::Kind::kValue);
    EXPECT_NE(std::string(e.what()).find("weight must have shape [D] = [4]"), std::string::npos)
        << e.what();
  }
  in.weight = ref(w, {4});
  in.gate = ref(x, {3, 4});
  EXPECT_THROW(flashdelta::rms_norm_forward(in, out), Error);  // rms_norm takes no gate
  in.gate = TensorRef{};
  EXPECT_THROW(flashdelta::rms_norm_gated_forward(in, out), Error);  // ... rms_norm_gated does
  in.x.dtype = DType::kInt32;
  try {
    flashdelta::rms_norm_forward(in, out);
    FAIL() << "did not raise";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), Error::Kind::kType);
  }
}

class GatedProduct : public ::testing::TestWithParam<bool> {};  // swiglu (true) / attention gate

TEST_P(GatedProduct, ForwardBackwardMatchDoubleReference) {
  const bool swiglu = GetParam();
  const int64_t R = 9, D = 20, stride = 33;
  auto v = randn(R * D, 1), g = randn(R * stride, 2, 3.f), dy = randn(R * D, 3);
  std::vector<float> out(R * D), dv(R * D), dg(R * D);
  flashdelta::GatedProductArgs in;
  in.value = ref(v, {R, D});
  in.gate = rows(g, R, D, stride);
  flashdelta::GatedProductGradients grads{ref(dy, {R, D}), ref(dv, {R, D}), ref(dg, {R, D})};
  if (swiglu) {
    flashdelta::swiglu_forward(in, ref(out, {R, D}));
    flashdelta::swiglu_backward(in, grads);
  } else {
    flashdelta::attention_gate_forward(in, ref(out, {R, D}));
    flashdelta::attention_gate_backward(in, grads);
  }
  std::vector<double> o_ref(R * D), dv_ref(R * D), dg_ref(R * D);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < D; ++j) {
      const double z = g[r * stride + j], val = v[r * D + j], d = dy[r * D + j], s = sigmoid(z);
      const double act = swiglu ? silu(z) : s;
      const double dact = swiglu ? s * (1 + z * (1 - s)) : s * (1 - s);
      o_ref[r * D + j] = val * act;
      dv_ref[r * D + j] = d * act;
      dg_ref[r * D + j] = d * val * dact;
    }
  }
  EXPECT_LT(max_rel_err(out, o_ref), 1e-6);
  EXPECT_LT(max_rel_err(dv, dv_ref), 1e-6);
  EXPECT_LT(max_rel_err(dg, dg_ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Ops, GatedProduct, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "Swiglu" : "AttentionGate"; });

TEST(PartialRotaryEmbedding, ForwardMatchesFormulaAndBackwardIsItsAdjoint) {
  const int64_t B = 2, T = 3, H = 3, HK = 1, D = 16, RD = 8, half = RD / 2;
  auto q = randn(B * T * H * D, 1), k = randn(B * T * HK * D, 2);
  auto cos = randn(B * T * RD, 3), sin = randn(B * T * RD, 4);  // halves need not agree
  std::vector<float> qo(q.size()), ko(k.size());
  flashdelta::PartialRotaryEmbeddingArgs in;
  in.q = ref(q, {B, T, H, D});
  in.k = ref(k, {B, T, HK, D});
  in.cos = ref(cos, {B, T, RD});
  in.sin = ref(sin, {B, T, RD});
  flashdelta::partial_rotary_embedding_forward(in, ref(qo, {B, T, H, D}), ref(ko, {B, T, HK, D}));
  std::vector<double> qo_ref(q.size());
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float* c = &cos[bt * RD];
    const float* s = &sin[bt * RD];
    for (int64_t h = 0; h < H; ++h) {
      const int64_t o = (bt * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        qo_ref[o + i] = double(q[o + i]) * c[i] - double(q[o + i + half]) * s[i];
        qo_ref[o + i + half] = double(q[o + i + half]) * c[i + half] + double(q[o + i]) * s[i + half];
      }
      for (int64_t j = RD; j < D; ++j) qo_ref[o + j] = q[o + j];
    }
  }
  EXPECT_LT(max_rel_err(qo, qo_ref), 1e-6);

  // backward: <rope(x), y> == <x, rope^T(y)> for x = q, k and any y
  auto yq = randn(q.size(), 5), yk = randn(k.size(), 6);
  std::vector<float> dq(q.size()), dk(k.size());
  flashdelta::PartialRotaryEmbeddingArgs grads = in;
  grads.q = ref(yq, {B, T, H, D});
  grads.k = ref(yk, {B, T, HK, D});
  flashdelta::partial_rotary_embedding_backward(grads, ref(dq, {B, T, H, D}),
                                                ref(dk, {B, T, HK, D}));
  double lhs = 0, rhs = 0, scale = 0;
  for (size_t i = 0; i < q.size(); ++i) {
    lhs += double(qo[i]) * yq[i];
    rhs += double(q[i]) * dq[i];
    scale += std::abs(double(q[i]) * dq[i]);
  }
  for (size_t i = 0; i < k.size(); ++i) {
    lhs += double(ko[i]) * yk[i];
    rhs += double(k[i]) * dk[i];
  }
  EXPECT_LT(std::abs(lhs - rhs), 1e-5 * scale);

  // rotary_dim must be even and fit the head
  std::vector<float> odd(B * T * 7);
  in.cos = ref(odd, {B, T, 7});
  in.sin = ref(odd, {B, T, 7});
  EXPECT_THROW(
      flashdelta::partial_rotary_embedding_forward(in, ref(qo, {B, T, H, D}), ref(ko, {B, T, HK, D})),
      Error);
}

}  // namespace
