// Test support for the gated delta rule ops; see gdn_reference.h.
#include "gdn_reference.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>
#include <stdexcept>

namespace gdn_test {

// ---------------------------------------------------------------------------------------------
// Scalar conversions.

uint16_t float_to_bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x0040);  // quiet NaN
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

uint16_t float_to_fp16_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

float fp16_bits_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

double round_to(double x, DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return x;
    case DType::kFloat32: return static_cast<float>(x);
    case DType::kBFloat16: return bf16_bits_to_float(float_to_bf16_bits(static_cast<float>(x)));
    case DType::kFloat16: return fp16_bits_to_float(float_to_fp16_bits(static_cast<float>(x)));
    case DType::kInt32: return static_cast<int32_t>(x);
    case DType::kInt64: return static_cast<int64_t>(x);
    case DType::kUInt8: return static_cast<uint8_t>(x);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Rng.

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

double Rng::normal() {
  // Box-Muller; 1 - u is in (0, 1].
  const double u1 = 1.0 - uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

int64_t Rng::below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }

// ---------------------------------------------------------------------------------------------
// HostTensor.

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape, const Layout& layout)
    : defined_(true), dtype_(dtype), shape_(std::move(shape)) {
  const int rank = static_cast<int>(shape_.size());
  std::vector<int64_t> storage_dims(shape_);
  if (!layout.pad.empty()) {
    if (layout.pad.size() != shape_.size()) throw std::logic_error("HostTensor: bad pad");
    for (int d = 0; d < rank; ++d) storage_dims[d] += layout.pad[d];
  }
  std::vector<int> order(rank);
  std::iota(order.begin(), order.end(), 0);
  if (!layout.order.empty()) {
    if (layout.order.size() != shape_.size()) throw std::logic_error("HostTensor: bad order");
    order = layout.order;
  }
  strides_.assign(rank, 0);
  int64_t stride = 1;
  for (int i = rank - 1; i >= 0; --i) {
    strides_[order[i]] = stride;
    stride *= storage_dims[order[i]];
  }
  bytes_.assign(static_cast<size_t>(stride) * flashdelta::dtype_size(dtype_), 0xFF);
}

HostTensor HostTensor::from_values(DType dtype, std::vector<int64_t> shape,
                                   const std::vector<double>& values, const Layout& layout) {
  HostTensor t(dtype, std::move(shape), layout);
  t.set_values(values);
  return t;
}

TensorRef HostTensor::ref() const {
  if (!defined_) return TensorRef{};
  TensorRef t;
  t.data = const_cast<unsigned char*>(bytes_.data());
  t.dtype = dtype_;
  t.rank = static_cast<int>(shape_.size());
  for (int d = 0; d < t.rank; ++d) {
    t.shape[d] = shape_[d];
    t.strides[d] = strides_[d];
  }
  return t;
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

int64_t HostTensor::offset(int64_t flat) const {
  int64_t off = 0;
  for (int d = static_cast<int>(shape_.size()) - 1; d >= 0; --d) {
    off += (flat % shape_[d]) * strides_[d];
    flat /= shape_[d];
  }
  return off;
}

double HostTensor::get(int64_t flat) const {
  const unsigned char* p = bytes_.data() + offset(flat) * flashdelta::dtype_size(dtype_);
  switch (dtype_) {
    case DType::kFloat32: {
      float x;
      std::memcpy(&x, p, 4);
      return x;
    }
    case DType::kFloat64: {
      double x;
      std::memcpy(&x, p, 8);
      return x;
    }
    case DType::kBFloat16: {
      uint16_t b;
      std::memcpy(&b, p, 2);
      return bf16_bits_to_float(b);
    }
    case DType::kFloat16: {
      uint16_t b;
      std::memcpy(&b, p, 2);
      return fp16_bits_to_float(b);
    }
    case DType::kInt32: {
      int32_t x;
      std::memcpy(&x, p, 4);
      return x;
    }
    case DType::kInt64: {
      int64_t x;
      std::memcpy(&x, p, 8);
      return static_cast<double>(x);
    }
    case DType::kUInt8: return *p;
  }
  return 0.0;
}

void HostTensor::set(int64_t flat, double x) {
  unsigned char* p = bytes_.data() + offset(flat) * flashdelta::dtype_size(dtype_);
  switch (dtype_) {
    case DType::kFloat32: {
      float y = static_cast<float>(x);
      std::memcpy(p, &y, 4);
      break;
    }
    case DType::kFloat64: std::memcpy(p, &x, 8); break;
    case DType::kBFloat16: {
      uint16_t b = float_to_bf16_bits(static_cast<float>(x));
      std::memcpy(p, &b, 2);
      break;
    }
    case DType::kFloat16: {
      uint16_t b = float_to_fp16_bits(static_cast<float>(x));
      std::memcpy(p, &b, 2);
      break;
    }
    case DType::kInt32: {
      int32_t y = static_cast<int32_t>(x);
      std::memcpy(p, &y, 4);
      break;
    }
    case DType::kInt64: {
      int64_t y = static_cast<int64_t>(x);
      std::memcpy(p, &y, 8);
      break;
    }
    case DType::kUInt8: *p = static_cast<uint8_t>(x); break;
  }
}

std::vector<double> HostTensor::values() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[i] = get(i);
  return out;
}

void HostTensor::set_values(const std::vector<double>& values) {
  if (static_cast<int64_t>(values.size()) != numel()) {
    throw std::logic_error("HostTensor::set_values: wrong number of values");
  }
  for (int64_t i = 0; i < numel(); ++i) set(i, values[i]);
}

void HostTensor::fill(double x) {
  for (int64_t i = 0; i < numel(); ++i) set(i, x);
}

bool HostTensor::padding_untouched() const {
  const size_t es = flashdelta::dtype_size(dtype_);
  std::vector<char> logical(bytes_.size() / es, 0);
  for (int64_t i = 0; i < numel(); ++i) logical[offset(i)] = 1;
  for (size_t e = 0; e < logical.size(); ++e) {
    if (logical[e]) continue;
    for (size_t b = 0; b < es; ++b) {
      if (bytes_[e * es + b] != 0xFF) return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Problems.

namespace {

double softplus(double x) { return x > 30 ? x : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

std::vector<double> randn(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<double> x(n);
  for (double& e : x) e = scale * rng.normal();
  return x;
}

}  // namespace

GatedDeltaRuleInputs Problem::inputs() const {
  GatedDeltaRuleInputs in;
  in.q = q.ref();
  in.k = k.ref();
  in.v = v.ref();
  in.g = g.ref();
  in.beta = beta.ref();
  in.initial_state = h0.ref();
  in.cu_seqlens = cu_seqlens.ref();
  in.scale = spec.scale;
  in.use_qk_l2norm = spec.l2norm;
  return in;
}

Problem make_problem(const ProblemSpec& s) {
  if (!s.cu_seqlens.empty() && (s.B != 1 || s.cu_seqlens.back() != s.T)) {
    throw std::logic_error("make_problem: varlen needs B == 1 and cu_seqlens.back() == T");
  }
  Rng rng(s.seed);
  Problem p;
  p.spec = s;
  const int64_t BT = s.B * s.T;
  const int64_t N = s.num_seqs();

  std::vector<double> q = randn(BT * s.H * s.K, rng);
  std::vector<double> k = randn(BT * s.H * s.K, rng);
  for (int64_t row = 0; row < BT * s.H; ++row) {
    double* kr = k.data() + row * s.K;
    double* qr = q.data() + row * s.K;
    if (s.l2norm) {
      // Raw rows of varied norms: the op normalises them.
      const double fq = rng.uniform(0.3, 3.0), fk = rng.uniform(0.3, 3.0);
      for (int64_t i = 0; i < s.K; ++i) {
        qr[i] *= fq;
        kr[i] *= fk;
      }
    } else {
      // Keys of norm <= 1 keep the recurrence contractive (as models feed it); q of norm ~1.
      double nk = 0, nq = 0;
      for (int64_t i = 0; i < s.K; ++i) {
        nk += kr[i] * kr[i];
        nq += qr[i] * qr[i];
      }
      const double fk = rng.uniform(0.5, 1.0) / std::sqrt(nk), fq = 1.0 / std::sqrt(nq);
      for (int64_t i = 0; i < s.K; ++i) {
        kr[i] *= fk;
        qr[i] *= fq * std::sqrt(double(s.K)) * 0.5;
      }
    }
  }
  std::vector<double> v = randn(BT * s.HV * s.V, rng);
  std::vector<double> beta(BT * s.HV), g(BT * s.HV);
  for (double& b : beta) b = sigmoid(rng.normal());
  std::vector<double> A(s.HV);
  for (double& a : A) a = rng.uniform(0.01, 16.0);
  for (int64_t i = 0; i < BT * s.HV; ++i) {
    switch (s.gate) {
      case Gate::kRealistic: g[i] = -A[i % s.HV] * softplus(rng.normal() + 1.0); break;
      case Gate::kStrong: g[i] = rng.uniform(-30.0, 0.0); break;
      case Gate::kMild: g[i] = std::log(rng.uniform(0.9, 1.0)); break;
    }
  }

  const DType qkv = s.dtype, gates = s.gates_dtype(), state = s.state_dtype();
  p.q = HostTensor::from_values(qkv, {s.B, s.T, s.H, s.K}, q, s.q_layout);
  p.k = HostTensor::from_values(qkv, {s.B, s.T, s.H, s.K}, k, s.k_layout);
  p.v = HostTensor::from_values(qkv, {s.B, s.T, s.HV, s.V}, v, s.v_layout);
  p.g = HostTensor::from_values(gates, {s.B, s.T, s.HV}, g, s.g_layout);
  p.beta = HostTensor::from_values(gates, {s.B, s.T, s.HV}, beta, s.beta_layout);
  if (s.initial_state) {
    p.h0 = HostTensor::from_values(state, {N, s.HV, s.K, s.V},
                                   randn(N * s.HV * s.K * s.V, rng, 0.5), s.h0_layout);
  }
  if (!s.cu_seqlens.empty()) {
    std::vector<double> cu(s.cu_seqlens.begin(), s.cu_seqlens.end());
    p.cu_seqlens = HostTensor::from_values(s.cu_dtype, {int64_t(cu.size())}, cu);
  }

  RefProblem& r = p.ref;
  r.B = s.B, r.T = s.T, r.H = s.H, r.HV = s.HV, r.K = s.K, r.V = s.V;
  r.cu_seqlens = s.cu_seqlens;
  r.l2norm = s.l2norm;
  r.has_initial_state = s.initial_state;
  r.scale = s.scale > 0 ? s.scale : 1.0 / std::sqrt(static_cast<double>(s.K));
  r.q = p.q.values();
  r.k = p.k.values();
  r.v = p.v.values();
  r.g = p.g.values();
  r.beta = p.beta.values();
  if (s.initial_state) r.h0 = p.h0.values();
  return p;
}

// ---------------------------------------------------------------------------------------------
// Reference.

namespace {

struct Seq {
  int64_t b, n, begin, end;  // batch row, state index, token range
};

std::vector<Seq> sequences(const RefProblem& p) {
  std::vector<Seq> seqs;
  if (p.cu_seqlens.empty()) {
    for (int64_t b = 0; b < p.B; ++b) seqs.push_back({b, b, 0, p.T});
  } else {
    for (size_t n = 0; n + 1 < p.cu_seqlens.size(); ++n) {
      seqs.push_back({0, int64_t(n), p.cu_seqlens[n], p.cu_seqlens[n + 1]});
    }
  }
  return seqs;
}

constexpr double kL2NormEps = 1e-6;

// xn = x / r with r = sqrt(|x|^2 + eps) when l2norm, else xn = x, r = 1.
double load_row(const double* x, int64_t n, bool l2norm, double* xn) {
  double r = 1.0;
  if (l2norm) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    r = std::sqrt(ss + kL2NormEps);
  }
  for (int64_t i = 0; i < n; ++i) xn[i] = x[i] / r;
  return r;
}

}  // namespace

RefOutputs reference_forward(const RefProblem& p) {
  const int64_t T = p.T, H = p.H, HV = p.HV, K = p.K, V = p.V, group = HV / H;
  RefOutputs out;
  out.o.assign(p.B * T * HV * V, 0.0);
  out.final_state.assign(p.num_seqs() * HV * K * V, 0.0);
  std::vector<double> S(K * V), qn(K), kn(K), d(V);
  for (const Seq& seq : sequences(p)) {
    for (int64_t hv = 0; hv < HV; ++hv) {
      const int64_t hk = hv / group;
      const int64_t state_off = (seq.n * HV + hv) * K * V;
      for (int64_t e = 0; e < K * V; ++e) S[e] = p.has_initial_state ? p.h0[state_off + e] : 0.0;
      for (int64_t t = seq.begin; t < seq.end; ++t) {
        const int64_t tok = seq.b * T + t;
        load_row(&p.q[(tok * H + hk) * K], K, p.l2norm, qn.data());
        load_row(&p.k[(tok * H + hk) * K], K, p.l2norm, kn.data());
        const double a = std::exp(p.g[tok * HV + hv]);
        const double bt = p.beta[tok * HV + hv];
        const double* vt = &p.v[(tok * HV + hv) * V];
        for (double& e : S) e *= a;
        for (int64_t j = 0; j < V; ++j) {
          double u = 0;
          for (int64_t i = 0; i < K; ++i) u += S[i * V + j] * kn[i];
          d[j] = bt * (vt[j] - u);
        }
        for (int64_t i = 0; i < K; ++i) {
          for (int64_t j = 0; j < V; ++j) S[i * V + j] += kn[i] * d[j];
        }
        double* ot = &out.o[(tok * HV + hv) * V];
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += S[i * V + j] * qn[i];
          ot[j] = p.scale * acc;
        }
      }
      std::copy(S.begin(), S.end(), out.final_state.begin() + state_off);
    }
  }
  return out;
}

RefGrads reference_backward(const RefProblem& p, const std::vector<double>& d_o,
                            const std::vector<double>* d_final_state) {
  const int64_t T = p.T, H = p.H, HV = p.HV, K = p.K, V = p.V, group = HV / H;
  RefGrads gr;
  gr.dq.assign(p.q.size(), 0.0);
  gr.dk.assign(p.k.size(), 0.0);
  gr.dv.assign(p.v.size(), 0.0);
  gr.dg.assign(p.g.size(), 0.0);
  gr.dbeta.assign(p.beta.size(), 0.0);
  if (p.has_initial_state) gr.dh0.assign(p.h0.size(), 0.0);

  std::vector<double> S(K * V), Sp(K * V), St(K * V), dS(K * V);
  std::vector<double> qn(K), kn(K), u(V), d(V), dqn(K), dkn(K), dd(V), du(V);
  for (const Seq& seq : sequences(p)) {
    const int64_t len = seq.end - seq.begin;
    for (int64_t hv = 0; hv < HV; ++hv) {
      const int64_t hk = hv / group;
      const int64_t state_off = (seq.n * HV + hv) * K * V;
      // Forward, keeping S_{t-1} for every step.
      std::vector<double> prev(len * K * V);
      for (int64_t e = 0; e < K * V; ++e) S[e] = p.has_initial_state ? p.h0[state_off + e] : 0.0;
      for (int64_t t = seq.begin; t < seq.end; ++t) {
        const int64_t tok = seq.b * T + t;
        std::copy(S.begin(), S.end(), prev.begin() + (t - seq.begin) * K * V);
        load_row(&p.k[(tok * H + hk) * K], K, p.l2norm, kn.data());
        const double a = std::exp(p.g[tok * HV + hv]), bt = p.beta[tok * HV + hv];
        const double* vt = &p.v[(tok * HV + hv) * V];
        for (double& e : S) e *= a;
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += S[i * V + j] * kn[i];
          d[j] = bt * (vt[j] - acc);
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) S[i * V + j] += kn[i] * d[j];
      }
      // Backward.
      for (int64_t e = 0; e < K * V; ++e) {
        dS[e] = d_final_state != nullptr ? (*d_final_state)[state_off + e] : 0.0;
      }
      for (int64_t t = seq.end - 1; t >= seq.begin; --t) {
        const int64_t tok = seq.b * T + t;
        const double* qraw = &p.q[(tok * H + hk) * K];
        const double* kraw = &p.k[(tok * H + hk) * K];
        const double rq = load_row(qraw, K, p.l2norm, qn.data());
        const double rk = load_row(kraw, K, p.l2norm, kn.data());
        const double a = std::exp(p.g[tok * HV + hv]), bt = p.beta[tok * HV + hv];
        const double* vt = &p.v[(tok * HV + hv) * V];
        const double* Sprev = &prev[(t - seq.begin) * K * V];
        for (int64_t e = 0; e < K * V; ++e) Sp[e] = a * Sprev[e];
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += Sp[i * V + j] * kn[i];
          u[j] = acc;
          d[j] = bt * (vt[j] - acc);
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) St[i * V + j] = Sp[i * V + j] + kn[i] * d[j];
        // o_t = scale S_t^T qn
        const double* dot = &d_o[(tok * HV + hv) * V];
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) {
            acc += St[i * V + j] * dot[j];
            dS[i * V + j] += p.scale * qn[i] * dot[j];
          }
          dqn[i] = p.scale * acc;
        }
        // S_t = S' + kn d^T
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) acc += dS[i * V + j] * d[j];
          dkn[i] = acc;
        }
        double dbeta = 0;
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += dS[i * V + j] * kn[i];
          dd[j] = acc;
          // d = bt (v - u)
          dbeta += acc * (vt[j] - u[j]);
          gr.dv[(tok * HV + hv) * V + j] = bt * acc;
          du[j] = -bt * acc;
        }
        gr.dbeta[tok * HV + hv] = dbeta;
        // u = S'^T kn; dS' = dS + kn du^T
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) {
            acc += Sp[i * V + j] * du[j];
            dS[i * V + j] += kn[i] * du[j];
          }
          dkn[i] += acc;
        }
        // S' = exp(g) S_{t-1}
        double dg = 0;
        for (int64_t e = 0; e < K * V; ++e) {
          dg += dS[e] * Sp[e];
          dS[e] *= a;
        }
        gr.dg[tok * HV + hv] = dg;
        // l2norm: dx = (dxn - xn (xn . dxn)) / r
        double pq = 0, pk = 0;
        if (p.l2norm) {
          for (int64_t i = 0; i < K; ++i) {
            pq += qn[i] * dqn[i];
            pk += kn[i] * dkn[i];
          }
        }
        for (int64_t i = 0; i < K; ++i) {
          gr.dq[(tok * H + hk) * K + i] += (dqn[i] - qn[i] * pq) / rq;
          gr.dk[(tok * H + hk) * K + i] += (dkn[i] - kn[i] * pk) / rk;
        }
      }
      if (p.has_initial_state) std::copy(dS.begin(), dS.end(), gr.dh0.begin() + state_off);
    }
  }
  return gr;
}

double reference_loss(const RefProblem& p, const std::vector<double>& w_o,
                      const std::vector<double>* w_s) {
  const RefOutputs out = reference_forward(p);
  long double loss = 0;
  for (size_t i = 0; i < out.o.size(); ++i) loss += static_cast<long double>(w_o[i]) * out.o[i];
  if (w_s != nullptr) {
    for (size_t i = 0; i < out.final_state.size(); ++i) {
      loss += static_cast<long double>((*w_s)[i]) * out.final_state[i];
    }
  }
  return static_cast<double>(loss);
}

// ---------------------------------------------------------------------------------------------
// Running an op.

const OpTable kChunkOp = {
    "chunk_gated_delta_rule",
    [](const GatedDeltaRuleInputs& in) {
      return flashdelta::chunk_gated_delta_rule_forward_workspace_bytes(in);
    },
    [](const GatedDeltaRuleInputs& in) {
      return flashdelta::chunk_gated_delta_rule_backward_workspace_bytes(in);
    },
    flashdelta::chunk_gated_delta_rule_forward,
    flashdelta::chunk_gated_delta_rule_backward,
};

const OpTable kFusedRecurrentOp = {
    "fused_recurrent_gated_delta_rule",
    [](const GatedDeltaRuleInputs& in) {
      return flashdelta::fused_recurrent_gated_delta_rule_forward_workspace_bytes(in);
    },
    [](const GatedDeltaRuleInputs& in) {
      return flashdelta::fused_recurrent_gated_delta_rule_backward_workspace_bytes(in);
    },
    flashdelta::fused_recurrent_gated_delta_rule_forward,
    flashdelta::fused_recurrent_gated_delta_rule_backward,
};

ForwardRun run_forward(const OpTable& op, const Problem& p, bool final_state,
                       const Layout& o_layout) {
  const ProblemSpec& s = p.spec;
  const GatedDeltaRuleInputs in = p.inputs();
  ForwardRun r;
  r.o = HostTensor(s.dtype, {s.B, s.T, s.HV, s.V}, o_layout);
  if (final_state) r.final_state = HostTensor(s.state_dtype(), {s.num_seqs(), s.HV, s.K, s.V});
  const size_t bytes = op.forward_workspace_bytes(in);
  r.workspace = HostTensor(DType::kUInt8, {std::max<int64_t>(int64_t(bytes), 1)});
  GatedDeltaRuleForwardOutputs out;
  out.o = r.o.ref();
  out.final_state = r.final_state.ref();
  out.workspace = r.workspace.ref();
  op.forward(in, out);
  return r;
}

BackwardRun run_backward(const OpTable& op, const Problem& p, const HostTensor& d_o,
                         const HostTensor* d_final_state, const Layout& grad_layout) {
  const ProblemSpec& s = p.spec;
  const GatedDeltaRuleInputs in = p.inputs();
  BackwardRun r;
  const DType gates = s.gates_dtype();
  r.dq = HostTensor(s.dtype, {s.B, s.T, s.H, s.K}, grad_layout);
  r.dk = HostTensor(s.dtype, {s.B, s.T, s.H, s.K}, grad_layout);
  r.dv = HostTensor(s.dtype, {s.B, s.T, s.HV, s.V}, grad_layout);
  Layout gate_layout;
  if (!grad_layout.pad.empty()) {
    gate_layout.pad.assign(grad_layout.pad.begin(), grad_layout.pad.begin() + 3);
  }
  r.dg = HostTensor(gates, {s.B, s.T, s.HV}, gate_layout);
  r.dbeta = HostTensor(gates, {s.B, s.T, s.HV}, gate_layout);
  if (s.initial_state) r.dh0 = HostTensor(s.state_dtype(), {s.num_seqs(), s.HV, s.K, s.V});
  const size_t bytes = op.backward_workspace_bytes(in);
  r.workspace = HostTensor(DType::kUInt8, {std::max<int64_t>(int64_t(bytes), 1)});
  GatedDeltaRuleBackwardInputs gin;
  gin.d_o = d_o.ref();
  if (d_final_state != nullptr) gin.d_final_state = d_final_state->ref();
  GatedDeltaRuleBackwardOutputs gout;
  gout.dq = r.dq.ref();
  gout.dk = r.dk.ref();
  gout.dv = r.dv.ref();
  gout.dg = r.dg.ref();
  gout.dbeta = r.dbeta.ref();
  gout.d_initial_state = r.dh0.ref();
  gout.workspace = r.workspace.ref();
  op.backward(in, gin, gout);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Comparisons.

bool verbose() {
  static const bool v = std::getenv("FLASHDELTA_TEST_VERBOSE") != nullptr;
  return v;
}

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kF64: return "f64";
    case Precision::kF32: return "f32";
    case Precision::kBF16: return "bf16";
    case Precision::kF16: return "f16";
    case Precision::kBF16GatesF32: return "bf16_gates_f32";
  }
  return "?";
}

void apply_precision(ProblemSpec& spec, Precision p) {
  spec.gate_dtype_set = false;
  switch (p) {
    case Precision::kF64: spec.dtype = DType::kFloat64; break;
    case Precision::kF32: spec.dtype = DType::kFloat32; break;
    case Precision::kBF16: spec.dtype = DType::kBFloat16; break;
    case Precision::kF16: spec.dtype = DType::kFloat16; break;
    case Precision::kBF16GatesF32:
      spec.dtype = DType::kBFloat16;
      spec.gate_dtype_set = true;
      spec.gate_dtype = DType::kFloat32;
      break;
  }
}

// The reference runs on the inputs as rounded to the op's dtypes, so these measure the op's own
// arithmetic (fp32 accumulation) plus the rounding of its outputs to their dtype.
Tolerance forward_tolerance(Precision p) {
  switch (p) {
    case Precision::kF64: return {1e-10, 1e-10};
    case Precision::kF32: return {1e-4, 1e-4};
    case Precision::kF16: return {2e-3, 2e-3};
    case Precision::kBF16:
    case Precision::kBF16GatesF32: return {1e-2, 1e-2};
  }
  return {0, 0};
}

Tolerance backward_tolerance(Precision p) {
  switch (p) {
    case Precision::kF64: return {1e-9, 1e-9};
    case Precision::kF32: return {1e-4, 1e-4};
    case Precision::kF16: return {3e-3, 3e-3};
    case Precision::kBF16:
    case Precision::kBF16GatesF32: return {1.5e-2, 1.5e-2};
  }
  return {0, 0};
}

::testing::AssertionResult all_close(const std::string& what, const std::vector<double>& got,
                                     const std::vector<double>& ref, const Tolerance& tol,
                                     double floor) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " values, expected " << ref.size();
  }
  double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
  int64_t worst = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      return ::testing::AssertionFailure() << what << ": element " << i << " of " << got.size()
                                           << " is " << got[i] << " (reference " << ref[i] << ")";
    }
    const double e = std::abs(got[i] - ref[i]);
    err2 += e * e;
    ref2 += ref[i] * ref[i];
    max_ref = std::max(max_ref, std::abs(ref[i]));
    if (e > max_err) {
      max_err = e;
      worst = int64_t(i);
    }
  }
  const double rel_l2 =
      std::sqrt(err2) / std::max({std::sqrt(ref2), floor * std::sqrt(double(ref.size())), 1e-300});
  const double rel_max = max_err / std::max({max_ref, floor, 1e-300});
  const bool ok = (rel_l2 <= tol.rel_l2 && rel_max <= tol.rel_max) || max_err <= 1e-300;
  auto result = ok ? ::testing::AssertionSuccess() : ::testing::AssertionFailure();
  result << what << ": rel L2 error " << rel_l2 << " (tol " << tol.rel_l2 << "), max error "
         << max_err << " / max|ref| " << max_ref << " = " << rel_max << " (tol " << tol.rel_max
         << ")";
  if (worst >= 0) {
    result << ", worst at element " << worst << ": got " << got[worst] << ", reference "
           << ref[worst];
  }
  if (verbose()) std::printf("  [all_close] %s\n", result.message());
  return result;
}

std::vector<double> random_weights(size_t n, Rng& rng, DType dtype) {
  std::vector<double> w(n);
  for (double& x : w) x = round_to(rng.normal(), dtype);
  return w;
}

std::vector<FdSample> finite_differences(const RefProblem& p0,
                                         std::vector<double> RefProblem::*member,
                                         const std::vector<double>& w_o,
                                         const std::vector<double>* w_s, int max_samples, Rng& rng,
                                         double h) {
  RefProblem p = p0;
  std::vector<double>& x = p.*member;
  const int64_t n = int64_t(x.size());
  std::vector<int64_t> idx;
  if (n <= max_samples) {
    idx.resize(n);
    std::iota(idx.begin(), idx.end(), 0);
  } else {
    // Always the first and last element, the rest at random (distinct).
    std::vector<char> taken(n, 0);
    idx = {0, n - 1};
    taken[0] = taken[n - 1] = 1;
    while (int64_t(idx.size()) < max_samples) {
      const int64_t i = rng.below(n);
      if (!taken[i]) {
        taken[i] = 1;
        idx.push_back(i);
      }
    }
  }
  std::vector<FdSample> out;
  for (int64_t i : idx) {
    const double x0 = x[i];
    double f[4];
    const double steps[4] = {2 * h, h, -h, -2 * h};
    for (int s = 0; s < 4; ++s) {
      x[i] = x0 + steps[s];
      f[s] = reference_loss(p, w_o, w_s);
    }
    x[i] = x0;
    out.push_back({i, (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h)});
  }
  return out;
}

::testing::AssertionResult matches_fd(const std::string& what, const std::vector<double>& analytic,
                                      const std::vector<FdSample>& fd, double grad_scale,
                                      double rtol, double atol_rel) {
  double max_fd = 0;
  for (const FdSample& s : fd) max_fd = std::max(max_fd, std::abs(s.value));
  const double atol = atol_rel * std::max(max_fd, grad_scale) + 1e-300;
  double worst_ratio = 0;
  const FdSample* worst = nullptr;
  for (const FdSample& s : fd) {
    const double a = analytic.at(size_t(s.index));
    const double allowed = rtol * std::abs(s.value) + atol;
    const double ratio = std::isfinite(a) ? std::abs(a - s.value) / allowed
                                          : std::numeric_limits<double>::infinity();
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = &s;
    }
  }
  auto result = worst_ratio <= 1.0 ? ::testing::AssertionSuccess() : ::testing::AssertionFailure();
  result << what << ": " << fd.size() << " finite-difference samples, max|fd| " << max_fd;
  if (worst != nullptr) {
    result << "; worst at element " << worst->index << ": analytic "
           << analytic.at(size_t(worst->index)) << " vs finite difference " << worst->value
           << " (error / allowed = " << worst_ratio << ")";
  }
  if (verbose()) std::printf("  [matches_fd] %s\n", result.message());
  return result;
}

double max_abs_gradient(const RefGrads& g) {
  double m = 0;
  for (const std::vector<double>* x : {&g.dq, &g.dk, &g.dv, &g.dg, &g.dbeta, &g.dh0}) {
    for (double e : *x) m = std::max(m, std::abs(e));
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Cases.

std::string describe(const ProblemSpec& s) {
  std::ostringstream o;
  o << s.name << ": B=" << s.B << " T=" << s.T << " H=" << s.H << " HV=" << s.HV << " K=" << s.K
    << " V=" << s.V;
  if (!s.cu_seqlens.empty()) {
    o << " cu_seqlens(" << flashdelta::dtype_name(s.cu_dtype) << ")={";
    for (size_t i = 0; i < s.cu_seqlens.size(); ++i) o << (i ? "," : "") << s.cu_seqlens[i];
    o << "}";
  }
  const char* gates[] = {"realistic", "strong", "mild"};
  o << " dtype=" << flashdelta::dtype_name(s.dtype)
    << " gates=" << flashdelta::dtype_name(s.gates_dtype()) << " l2norm=" << s.l2norm
    << " initial_state=" << s.initial_state << " final_state=" << s.final_state
    << " d_final_state=" << s.d_final_state << " scale=" << s.scale
    << " gate=" << gates[static_cast<int>(s.gate)] << " seed=" << s.seed;
  return o.str();
}

namespace {

ProblemSpec base(const char* name, int64_t B, int64_t T, int64_t H, int64_t HV, int64_t K,
                 int64_t V, uint64_t seed) {
  ProblemSpec s;
  s.name = name;
  s.B = B, s.T = T, s.H = H, s.HV = HV, s.K = K, s.V = V;
  s.seed = seed;
  return s;
}

}  // namespace

const std::vector<ProblemSpec>& forward_cases() {
  static const std::vector<ProblemSpec> cases = [] {
    std::vector<ProblemSpec> c;
    ProblemSpec s;
    s = base("T1_HV4H2_K32V48_l2_state", 2, 1, 2, 4, 32, 48, 11);
    s.l2norm = s.initial_state = s.final_state = true;
    c.push_back(s);
    s = base("T63_HV2H1_K48V16_final", 1, 63, 1, 2, 48, 16, 12);
    s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("T64_B2_HV2H2_K32V32_l2_h0", 2, 64, 2, 2, 32, 32, 13);
    s.l2norm = s.initial_state = true;
    c.push_back(s);
    s = base("T65_HV4H1_K16V64_l2_state_strong", 1, 65, 1, 4, 16, 64, 14);
    s.l2norm = s.initial_state = s.final_state = true;
    s.gate = Gate::kStrong;
    c.push_back(s);
    s = base("T200_HV4H2_K32V48_l2_state", 1, 200, 2, 4, 32, 48, 15);
    s.l2norm = s.initial_state = s.final_state = true;
    c.push_back(s);
    s = base("T130_K128V128_mild_state", 1, 130, 1, 1, 128, 128, 16);
    s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    s.l2norm = true;
    c.push_back(s);
    s = base("T17_B3_HV2H1_K16V16_scale03", 3, 17, 1, 2, 16, 16, 17);
    s.scale = 0.3;
    s.final_state = true;
    c.push_back(s);
    s = base("varlen_i32_empty_len1_l2_state", 1, 135, 1, 2, 32, 16, 18);
    s.cu_seqlens = {0, 0, 1, 70, 70, 135};
    s.cu_dtype = DType::kInt32;
    s.l2norm = s.initial_state = s.final_state = true;
    c.push_back(s);
    s = base("varlen_i64_empty_len1_mild_final", 1, 135, 2, 4, 16, 32, 19);
    s.cu_seqlens = {0, 0, 1, 70, 70, 135};
    s.cu_dtype = DType::kInt64;
    s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("varlen_i64_chunk_aligned_l2_state", 1, 193, 2, 4, 16, 32, 20);
    s.cu_seqlens = {0, 64, 128, 193};
    s.l2norm = s.initial_state = s.final_state = true;
    c.push_back(s);
    s = base("varlen_i32_single_and_trailing_empty", 1, 66, 1, 1, 8, 24, 21);
    s.cu_seqlens = {0, 66, 66};
    s.cu_dtype = DType::kInt32;
    s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    return c;
  }();
  return cases;
}

const std::vector<ProblemSpec>& backward_cases() {
  static const std::vector<ProblemSpec> cases = [] {
    std::vector<ProblemSpec> c;
    ProblemSpec s;
    s = base("T70_B2_K8V16_state_mild", 2, 70, 1, 1, 8, 16, 31);
    s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("T65_HV4H2_K16V8_l2_state", 1, 65, 2, 4, 16, 8, 32);
    s.l2norm = s.initial_state = s.final_state = true;
    c.push_back(s);
    s = base("T1_B2_HV2H1_K8V8_l2_final", 2, 1, 1, 2, 8, 8, 33);
    s.l2norm = s.final_state = true;
    c.push_back(s);
    s = base("T63_HV2H1_K12V10_no_state_mild", 1, 63, 1, 2, 12, 10, 34);
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("T70_K8V8_final_without_dfinal_mild", 1, 70, 1, 1, 8, 8, 35);
    s.final_state = true;
    s.d_final_state = false;
    s.initial_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("varlen_i32_empty_len1_l2_state", 1, 135, 1, 2, 8, 16, 36);
    s.cu_seqlens = {0, 0, 1, 70, 70, 135};
    s.cu_dtype = DType::kInt32;
    s.l2norm = s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("varlen_i64_HV4H2_final_mild", 1, 130, 2, 4, 8, 8, 37);
    s.cu_seqlens = {0, 64, 65, 130};
    s.final_state = true;
    s.gate = Gate::kMild;
    c.push_back(s);
    s = base("T70_HV2H1_K8V8_l2_state_strong", 1, 70, 1, 2, 8, 8, 38);
    s.l2norm = s.initial_state = s.final_state = true;
    s.gate = Gate::kStrong;
    c.push_back(s);
    s = base("T135_K8V12_state_mild_scale", 1, 135, 1, 1, 8, 12, 39);
    s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    s.scale = 0.7;
    c.push_back(s);
    // Head sizes of a real model's order (several register/cache tiles), fewer FD samples.
    s = base("T150_HV2H1_K64V48_l2_state", 1, 150, 1, 2, 64, 48, 40);
    s.l2norm = s.initial_state = s.final_state = true;
    s.fd_samples = 8;
    c.push_back(s);
    return c;
  }();
  return cases;
}

ProblemSpec random_spec(uint64_t seed) {
  Rng rng(seed + 1000);
  ProblemSpec s;
  s.name = "random_" + std::to_string(seed);
  s.seed = seed + 2000;
  const int64_t ks[] = {8, 16, 24, 32, 40, 64}, vs[] = {8, 12, 16, 48, 64}, ratios[] = {1, 2, 4};
  s.H = 1 + rng.below(3);
  s.HV = s.H * ratios[rng.below(3)];
  s.K = ks[rng.below(6)];
  s.V = vs[rng.below(5)];
  if (rng.below(2) == 0) {
    s.B = 1 + rng.below(3);
    s.T = 1 + rng.below(150);
  } else {
    s.B = 1;
    const int64_t n = 1 + rng.below(5);
    s.cu_seqlens = {0};
    for (int64_t i = 0; i < n; ++i) {
      const int64_t len = rng.below(3) == 0 ? rng.below(2) : rng.below(81);  // many 0s and 1s
      s.cu_seqlens.push_back(s.cu_seqlens.back() + len);
    }
    s.T = s.cu_seqlens.back();
    s.cu_dtype = rng.below(2) == 0 ? DType::kInt32 : DType::kInt64;
  }
  s.l2norm = rng.below(2) == 0;
  s.initial_state = rng.below(2) == 0;
  s.final_state = rng.below(3) != 0;
  s.d_final_state = rng.below(4) != 0;
  s.gate = static_cast<Gate>(rng.below(3));
  s.scale = rng.below(2) == 0 ? 0.0 : rng.uniform(0.1, 1.0);
  s.fd_samples = 4;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Shared test bodies.

void check_forward(const OpTable& op, ProblemSpec spec, Precision precision) {
  apply_precision(spec, precision);
  SCOPED_TRACE(describe(spec));
  const Problem p = make_problem(spec);
  const ForwardRun run = run_forward(op, p, spec.final_state);
  const RefOutputs ref = reference_forward(p.ref);
  const Tolerance tol = forward_tolerance(precision);
  EXPECT_TRUE(all_close(std::string(op.name) + " o", run.o.values(), ref.o, tol));
  if (spec.final_state) {
    EXPECT_TRUE(all_close(std::string(op.name) + " final_state", run.final_state.values(),
                          ref.final_state, tol));
  }
}

void check_backward(const OpTable& op, ProblemSpec spec, Precision precision) {
  apply_precision(spec, precision);
  SCOPED_TRACE(describe(spec));
  const Problem p = make_problem(spec);
  Rng rng(spec.seed * 7 + 3);
  const int64_t N = spec.num_seqs();
  const std::vector<double> w_o =
      random_weights(size_t(spec.B * spec.T * spec.HV * spec.V), rng, spec.dtype);
  const bool with_ds = spec.final_state && spec.d_final_state;
  std::vector<double> w_s;
  if (with_ds) w_s = random_weights(size_t(N * spec.HV * spec.K * spec.V), rng, spec.state_dtype());
  const HostTensor d_o =
      HostTensor::from_values(spec.dtype, {spec.B, spec.T, spec.HV, spec.V}, w_o);
  HostTensor d_fs;
  if (with_ds) {
    d_fs = HostTensor::from_values(spec.state_dtype(), {N, spec.HV, spec.K, spec.V}, w_s);
  }
  const BackwardRun run = run_backward(op, p, d_o, with_ds ? &d_fs : nullptr);
  const RefGrads ref = reference_backward(p.ref, w_o, with_ds ? &w_s : nullptr);
  const Tolerance tol = backward_tolerance(precision);
  const std::string name = op.name;
  const std::vector<double> dq = run.dq.values(), dk = run.dk.values(), dv = run.dv.values(),
                            dg = run.dg.values(), dbeta = run.dbeta.values();
  const double floor = 1e-3 * max_abs_gradient(ref);
  EXPECT_TRUE(all_close(name + " dq", dq, ref.dq, tol, floor));
  EXPECT_TRUE(all_close(name + " dk", dk, ref.dk, tol, floor));
  EXPECT_TRUE(all_close(name + " dv", dv, ref.dv, tol, floor));
  EXPECT_TRUE(all_close(name + " dg", dg, ref.dg, tol, floor));
  EXPECT_TRUE(all_close(name + " dbeta", dbeta, ref.dbeta, tol, floor));
  std::vector<double> dh0;
  if (spec.initial_state) {
    dh0 = run.dh0.values();
    EXPECT_TRUE(all_close(name + " d_initial_state", dh0, ref.dh0, tol, floor));
  }
  if (precision != Precision::kF64) return;

  // Against finite differences of the reference loss (independent of reference_backward).
  const std::vector<double>* ws = with_ds ? &w_s : nullptr;
  const int samples = spec.fd_samples;
  const double gs = max_abs_gradient(ref);
  EXPECT_TRUE(matches_fd(name + " dq vs FD", dq,
                         finite_differences(p.ref, &RefProblem::q, w_o, ws, samples, rng), gs));
  EXPECT_TRUE(matches_fd(name + " dk vs FD", dk,
                         finite_differences(p.ref, &RefProblem::k, w_o, ws, samples, rng), gs));
  EXPECT_TRUE(matches_fd(name + " dv vs FD", dv,
                         finite_differences(p.ref, &RefProblem::v, w_o, ws, samples, rng), gs));
  EXPECT_TRUE(matches_fd(name + " dg vs FD", dg,
                         finite_differences(p.ref, &RefProblem::g, w_o, ws, samples, rng), gs));
  EXPECT_TRUE(matches_fd(name + " dbeta vs FD", dbeta,
                         finite_differences(p.ref, &RefProblem::beta, w_o, ws, samples, rng), gs));
  if (spec.initial_state) {
    EXPECT_TRUE(matches_fd(name + " d_initial_state vs FD", dh0,
                           finite_differences(p.ref, &RefProblem::h0, w_o, ws, samples, rng), gs));
  }
}

void check_strided(const OpTable& op) {
  for (Precision precision : {Precision::kF64, Precision::kBF16GatesF32}) {
    SCOPED_TRACE(precision_name(precision));
    ProblemSpec s = base("strided", 2, 70, 2, 4, 16, 8, 51);
    s.l2norm = s.initial_state = s.final_state = true;
    s.gate = Gate::kMild;
    apply_precision(s, precision);
    ProblemSpec strided = s;
    strided.q_layout.pad = {0, 0, 0, 3};    // q[b, t, h, :] rows 19 apart: stride(2) = 19
    strided.k_layout.pad = {0, 1, 2, 0};    // k a slice of a bigger [B, T+1, H+2, K]
    strided.v_layout.order = {0, 2, 1, 3};  // v stored as [B, HV, T, V]
    strided.g_layout.order = {2, 0, 1};     // g stored as [HV, B, T]
    strided.beta_layout.pad = {1, 0, 5};    // beta with padding rows
    strided.h0_layout.pad = {0, 0, 0, 4};   // initial_state rows of V + 4
    const Problem pc = make_problem(s), ps = make_problem(strided);
    // Same values, different layouts.
    ASSERT_EQ(pc.ref.q, ps.ref.q);
    ASSERT_EQ(pc.ref.v, ps.ref.v);
    ASSERT_EQ(pc.ref.g, ps.ref.g);
    ASSERT_FALSE(ps.q.ref().is_contiguous());
    ASSERT_FALSE(ps.v.ref().is_contiguous());

    Layout o_layout;
    o_layout.pad = {0, 0, 1, 2};
    const ForwardRun fc = run_forward(op, pc, true);
    const ForwardRun fs = run_forward(op, ps, true, o_layout);
    EXPECT_EQ(fc.o.values(), fs.o.values()) << "o from strided inputs / into a strided o";
    EXPECT_EQ(fc.final_state.values(), fs.final_state.values());
    EXPECT_TRUE(fs.o.padding_untouched()) << "the op wrote outside o's elements";
    // And against the reference.
    const RefOutputs ref = reference_forward(ps.ref);
    EXPECT_TRUE(all_close("strided o", fs.o.values(), ref.o, forward_tolerance(precision)));

    Rng rng(5);
    const std::vector<double> w_o = random_weights(size_t(s.B * s.T * s.HV * s.V), rng, s.dtype);
    const std::vector<double> w_s =
        random_weights(size_t(s.B * s.HV * s.K * s.V), rng, s.state_dtype());
    const HostTensor d_o = HostTensor::from_values(s.dtype, {s.B, s.T, s.HV, s.V}, w_o);
    Layout d_o_layout;
    d_o_layout.order = {2, 0, 1, 3};
    const HostTensor d_o_strided =
        HostTensor::from_values(s.dtype, {s.B, s.T, s.HV, s.V}, w_o, d_o_layout);
    const HostTensor d_fs = HostTensor::from_values(s.state_dtype(), {s.B, s.HV, s.K, s.V}, w_s);
    Layout grad_layout;
    grad_layout.pad = {0, 1, 0, 1};
    const BackwardRun bc = run_backward(op, pc, d_o, &d_fs);
    const BackwardRun bs = run_backward(op, ps, d_o_strided, &d_fs, grad_layout);
    EXPECT_EQ(bc.dq.values(), bs.dq.values());
    EXPECT_EQ(bc.dk.values(), bs.dk.values());
    EXPECT_EQ(bc.dv.values(), bs.dv.values());
    EXPECT_EQ(bc.dg.values(), bs.dg.values());
    EXPECT_EQ(bc.dbeta.values(), bs.dbeta.values());
    EXPECT_EQ(bc.dh0.values(), bs.dh0.values());
    for (const HostTensor* t : {&bs.dq, &bs.dk, &bs.dv, &bs.dg, &bs.dbeta}) {
      EXPECT_TRUE(t->padding_untouched()) << "the op wrote outside a gradient's elements";
    }
    const RefGrads rg = reference_backward(ps.ref, w_o, &w_s);
    EXPECT_TRUE(all_close("strided dq", bs.dq.values(), rg.dq, backward_tolerance(precision)));
    EXPECT_TRUE(all_close("strided dg", bs.dg.values(), rg.dg, backward_tolerance(precision)));
  }
}

void check_inputs_unchanged_and_deterministic(const OpTable& op, Precision precision) {
  ProblemSpec s = base("unchanged", 1, 135, 1, 2, 16, 16, 61);
  s.cu_seqlens = {0, 0, 1, 70, 70, 135};
  s.cu_dtype = DType::kInt32;
  s.l2norm = s.initial_state = s.final_state = true;
  s.q_layout.pad = {0, 0, 0, 2};
  apply_precision(s, precision);
  const Problem p = make_problem(s);
  const Problem before = p;  // a deep copy of every buffer
  Rng rng(9);
  const int64_t N = s.num_seqs();
  const HostTensor d_o = HostTensor::from_values(
      s.dtype, {s.B, s.T, s.HV, s.V}, random_weights(size_t(s.T * s.HV * s.V), rng, s.dtype));
  const HostTensor d_fs =
      HostTensor::from_values(s.state_dtype(), {N, s.HV, s.K, s.V},
                              random_weights(size_t(N * s.HV * s.K * s.V), rng, s.state_dtype()));
  const HostTensor d_o_before = d_o, d_fs_before = d_fs;

  const ForwardRun f1 = run_forward(op, p, true);
  const BackwardRun b1 = run_backward(op, p, d_o, &d_fs);
  const ForwardRun f2 = run_forward(op, p, true);
  const BackwardRun b2 = run_backward(op, p, d_o, &d_fs);

  const std::pair<const HostTensor*, const HostTensor*> inputs[] = {
      {&p.q, &before.q},
      {&p.k, &before.k},
      {&p.v, &before.v},
      {&p.g, &before.g},
      {&p.beta, &before.beta},
      {&p.h0, &before.h0},
      {&p.cu_seqlens, &before.cu_seqlens},
      {&d_o, &d_o_before},
      {&d_fs, &d_fs_before}};
  const char* names[] = {
      "q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "d_o", "d_final_state"};
  for (int i = 0; i < 9; ++i) {
    EXPECT_TRUE(inputs[i].first->bytes() == inputs[i].second->bytes())
        << op.name << " modified " << names[i];
  }
  // Deterministic: bit-identical results run to run.
  EXPECT_TRUE(f1.o.bytes() == f2.o.bytes()) << "o differs between two runs";
  EXPECT_TRUE(f1.final_state.bytes() == f2.final_state.bytes());
  EXPECT_TRUE(b1.dq.bytes() == b2.dq.bytes());
  EXPECT_TRUE(b1.dk.bytes() == b2.dk.bytes());
  EXPECT_TRUE(b1.dv.bytes() == b2.dv.bytes());
  EXPECT_TRUE(b1.dg.bytes() == b2.dg.bytes());
  EXPECT_TRUE(b1.dbeta.bytes() == b2.dbeta.bytes());
  EXPECT_TRUE(b1.dh0.bytes() == b2.dh0.bytes());
}

namespace {

bool any_nan(const std::vector<double>& x) {
  return std::any_of(x.begin(), x.end(), [](double e) { return std::isnan(e); });
}

}  // namespace

void check_nan_propagates(const OpTable& op) {
  for (const char* where : {"v", "g", "q", "beta"}) {
    for (Precision precision : {Precision::kF64, Precision::kF32, Precision::kBF16}) {
      SCOPED_TRACE(std::string("NaN in ") + where + ", " + precision_name(precision));
      ProblemSpec s = base("nan", 1, 130, 1, 2, 16, 16, 71);
      s.initial_state = s.final_state = true;
      s.l2norm = true;
      apply_precision(s, precision);
      Problem p = make_problem(s);
      const int64_t t = 66, hv = 1;
      const double nan = std::numeric_limits<double>::quiet_NaN();
      if (std::string(where) == "v") p.v.set((t * s.HV + hv) * s.V + 3, nan);
      if (std::string(where) == "g") p.g.set(t * s.HV + hv, nan);
      if (std::string(where) == "beta") p.beta.set(t * s.HV + hv, nan);
      if (std::string(where) == "q") p.q.set(t * s.H * s.K + 5, nan);  // head 0 (both v heads)
      const ForwardRun run = run_forward(op, p, true);
      const std::vector<double> o = run.o.values();
      // o at (t, hv) depends on the NaN for every input but q through all its V values.
      bool nan_at_t = false;
      for (int64_t j = 0; j < s.V; ++j) nan_at_t |= std::isnan(o[(t * s.HV + hv) * s.V + j]);
      EXPECT_TRUE(nan_at_t) << "o[t = 66, hv = 1] has no NaN";
      if (std::string(where) != "q") {
        EXPECT_TRUE(any_nan(run.final_state.values())) << "final_state has no NaN";
      }
      Rng rng(3);
      const HostTensor d_o = HostTensor::from_values(
          s.dtype, {s.B, s.T, s.HV, s.V}, random_weights(size_t(s.T * s.HV * s.V), rng, s.dtype));
      const BackwardRun b = run_backward(op, p, d_o, nullptr);
      const bool grads_nan = any_nan(b.dq.values()) || any_nan(b.dk.values()) ||
                             any_nan(b.dv.values()) || any_nan(b.dg.values()) ||
                             any_nan(b.dbeta.values());
      EXPECT_TRUE(grads_nan) << "no gradient has a NaN";
    }
  }
}

}  // namespace gdn_test
