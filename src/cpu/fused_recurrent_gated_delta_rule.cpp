// Token-by-token gated delta rule on the CPU (the decode path), forward and backward.
//
// Per (sequence, value head) task, per token, with a = exp(g), P = a S (q scaled, normalised):
//   u = P^T k,  delta = beta (v - u),  S' = P + k delta^T,  o = S'^T q
// two passes over the [K, V] state per token. The backward walks the tokens in reverse with dS;
// it needs each token's incoming state, so it stores the state at every 64-token block start
// (one replay of the recurrence), then per block recomputes the block's 64 incoming states
// from its checkpoint (per-worker scratch) and steps back through them:
//   dS' += q do^T,  dq = S' do,  ddelta = dS'^T k,  dv = beta ddelta,
//   dbeta = ddelta . (v - u),  du = -beta ddelta,  dk = dS' delta + P du,
//   dP = dS' + k du^T,  dg = sum(dP * P),  dS = a dP.
#include <algorithm>
#include <cmath>

#include "flashdelta/fused_recurrent_gated_delta_rule.h"
#include "gated_delta_rule_common.h"
#include "gated_delta_rule_cpu.h"

namespace flashdelta::cpu {
namespace {

constexpr int64_t kBlock = 64;  // tokens per checkpoint and per load

template <typename Acc>
struct Scratch {
  Acc *q, *k, *v, *g, *beta, *o, *u, *S;      // forward
  Acc *d_o, *dq, *dk, *dv, *dg, *dbeta, *w, *dS, *history;  // backward

  static int64_t round(int64_t n) { return (n + 15) / 16 * 16; }
  // Lays the scratch out from `base` (or only counts with base == nullptr).
  int64_t carve(Acc* base, int64_t K, int64_t V, bool backward) {
    int64_t used = 0;
    auto take = [&](int64_t n) {
      Acc* p = base ? base + used : nullptr;
      used += round(n);
      return p;
    };
    q = take(kBlock * K), k = take(kBlock * K), v = take(kBlock * V);
    g = take(kBlock), beta = take(kBlock), o = take(kBlock * V), u = take(V), S = take(K * V);
    if (backward) {
      d_o = take(kBlock * V), dq = take(kBlock * K), dk = take(kBlock * K), dv = take(kBlock * V);
      dg = take(kBlock), dbeta = take(kBlock), w = take(V), dS = take(K * V);
      history = take(kBlock * K * V);
    }
    return used;
  }
};

template <typename Acc>
struct Runner {
  const GdnGeometry& geo;
  const GatedDeltaRuleInputs& in;
  Scratch<Acc>& s;
  int64_t K, V;

  // Loads tokens [t0, t0 + L) of value head hv.
  void load(int64_t b, int64_t t0, int64_t L, int64_t hv) {
    const int64_t hk = hv / geo.group;
    load_rows(in.q, b, t0, L, hk, s.q);
    load_rows(in.k, b, t0, L, hk, s.k);
    if (in.use_qk_l2norm) {
      l2norm_rows(s.q, L, K);
      l2norm_rows(s.k, L, K);
    }
    const Acc scale = static_cast<Acc>(geo.s.scale);
    for (int64_t i = 0; i < L * K; ++i) s.q[i] *= scale;
    load_rows(in.v, b, t0, L, hv, s.v);
    load_rows(in.g, b, t0, L, hv, s.g);
    load_rows(in.beta, b, t0, L, hv, s.beta);
  }

  // One token j of the loaded block: S <- S' and, when `o` is given, o = S'^T q.
  void step(int64_t j, Acc* S, Acc* o) {
    const Acc a = std::exp(s.g[j]);
    const Acc* k = s.k + j * K;
    const Acc* q = s.q + j * K;
    const Acc* v = s.v + j * V;
    std::fill(s.u, s.u + V, Acc(0));
    for (int64_t i = 0; i < K; ++i) {
      Acc* row = S + i * V;
      for (int64_t d = 0; d < V; ++d) {
        row[d] *= a;
        s.u[d] += k[i] * row[d];
      }
    }
    for (int64_t d = 0; d < V; ++d) s.u[d] = s.beta[j] * (v[d] - s.u[d]);  // delta
    if (o) std::fill(o, o + V, Acc(0));
    for (int64_t i = 0; i < K; ++i) {
      Acc* row = S + i * V;
      for (int64_t d = 0; d < V; ++d) row[d] += k[i] * s.u[d];
      if (o)
        for (int64_t d = 0; d < V; ++d) o[d] += q[i] * row[d];
    }
  }

  // Token j backwards. S_in: its incoming state; s.dS: gradient of its outgoing state, replaced
  // by the gradient of S_in. Writes dq (w.r.t. the scaled q), dk, dv, dg, dbeta of row j.
  void step_back(int64_t j, const Acc* S_in) {
    const Acc a = std::exp(s.g[j]), b = s.beta[j];
    const Acc* k = s.k + j * K;
    const Acc* q = s.q + j * K;
    const Acc* v = s.v + j * V;
    const Acc* d_o = s.d_o + j * V;
    Acc* dq = s.dq + j * K;
    Acc* dk = s.dk + j * K;
    Acc* dv = s.dv + j * V;
    Acc* u = s.u;  // u = P^T k, then delta
    Acc* w = s.w;  // w = dS^T k, then ddelta, then du
    std::fill(u, u + V, Acc(0));
    std::fill(w, w + V, Acc(0));
    Acc qk = 0;
    for (int64_t i = 0; i < K; ++i) {
      const Acc* row = S_in + i * V;
      const Acc* drow = s.dS + i * V;
      Acc pdo = 0;
      for (int64_t d = 0; d < V; ++d) {
        const Acc p = a * row[d];
        u[d] += k[i] * p;
        w[d] += k[i] * drow[d];
        pdo += p * d_o[d];
      }
      dq[i] = pdo;
      qk += q[i] * k[i];
    }
    Acc delta_do = 0, dbeta = 0;
    for (int64_t d = 0; d < V; ++d) {
      const Acc resid = v[d] - u[d];
      u[d] = b * resid;                  // delta
      delta_do += u[d] * d_o[d];
      const Acc ddelta = w[d] + d_o[d] * qk;
      dv[d] = b * ddelta;
      dbeta += ddelta * resid;
      w[d] = -b * ddelta;                // du
    }
    s.dbeta[j] = dbeta;
    Acc dg = 0;
    for (int64_t i = 0; i < K; ++i) {
      dq[i] += k[i] * delta_do;
      const Acc* row = S_in + i * V;
      Acc* drow = s.dS + i * V;
      Acc dki = q[i] * delta_do;
      for (int64_t d = 0; d < V; ++d) {
        const Acc p = a * row[d];
        dki += drow[d] * u[d] + p * w[d];
        const Acc dp = drow[d] + q[i] * d_o[d] + k[i] * w[d];
        dg += dp * p;
        drow[d] = a * dp;
      }
      dk[i] = dki;
    }
    s.dg[j] = dg;
  }
};

template <typename Acc>
struct Plan {
  int64_t scratch, workers, states, qk_grads;
  size_t bytes() const {
    return static_cast<size_t>(scratch * workers + states + 2 * qk_grads) * sizeof(Acc);
  }
};

template <typename Acc>
Plan<Acc> make_plan(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in, bool backward) {
  GdnGeometry geo(s, in);
  Scratch<Acc> counter;
  Plan<Acc> p;
  p.scratch = counter.carve(nullptr, s.head_k_dim, s.head_v_dim, backward);
  p.workers = std::min<int64_t>(num_threads(), std::max<int64_t>(1, s.num_seqs * s.num_v_heads));
  p.states = backward ? geo.num_slots(kBlock) * s.num_v_heads * s.head_k_dim * s.head_v_dim : 0;
  p.qk_grads = backward ? s.batch * s.seq_len * s.num_v_heads * s.head_k_dim : 0;
  return p;
}

template <typename Acc>
void forward_impl(const GatedDeltaRuleShape& shape, const GatedDeltaRuleInputs& in,
                  const GatedDeltaRuleForwardOutputs& out) {
  const GdnGeometry geo(shape, in);
  const Plan<Acc> plan = make_plan<Acc>(shape, in, false);
  Acc* ws = static_cast<Acc*>(out.workspace.data);
  const int64_t HV = shape.num_v_heads, K = shape.head_k_dim, V = shape.head_v_dim;
  parallel_for(shape.num_seqs * HV, [&](int64_t task, int worker) {
    const int64_t n = task / HV, hv = task % HV;
    Scratch<Acc> s;
    s.carve(ws + worker * plan.scratch, K, V, false);
    Runner<Acc> run{geo, in, s, K, V};
    if (in.initial_state.defined()) load_state(in.initial_state, n, hv, s.S);
    else std::fill(s.S, s.S + K * V, Acc(0));
    const auto seq = geo.seq(n);
    for (int64_t t0 = seq.begin; t0 < seq.end; t0 += kBlock) {
      const int64_t L = std::min(kBlock, seq.end - t0);
      run.load(seq.batch, t0, L, hv);
      for (int64_t j = 0; j < L; ++j) run.step(j, s.S, s.o + j * V);
      store_rows(out.o, seq.batch, t0, L, hv, s.o);
    }
    if (out.final_state.defined()) store_state(out.final_state, n, hv, s.S);
  });
}

template <typename Acc>
void backward_impl(const GatedDeltaRuleShape& shape, const GatedDeltaRuleInputs& in,
                   const GatedDeltaRuleBackwardInputs& gin,
                   const GatedDeltaRuleBackwardOutputs& gout) {
  const GdnGeometry geo(shape, in);
  const Plan<Acc> plan = make_plan<Acc>(shape, in, true);
  Acc* ws = static_cast<Acc*>(gout.workspace.data);
  Acc* states = ws + plan.scratch * plan.workers;
  Acc* dq_heads = states + plan.states;
  Acc* dk_heads = dq_heads + plan.qk_grads;
  const int64_t T = shape.seq_len, HV = shape.num_v_heads, K = shape.head_k_dim;
  const int64_t V = shape.head_v_dim, KV = K * V;
  const Acc scale = static_cast<Acc>(shape.scale);

  parallel_for(shape.num_seqs * HV, [&](int64_t task, int worker) {
    const int64_t n = task / HV, hv = task % HV;
    Scratch<Acc> s;
    s.carve(ws + worker * plan.scratch, K, V, true);
    Runner<Acc> run{geo, in, s, K, V};
    const auto seq = geo.seq(n);
    const int64_t num_blocks = (seq.end - seq.begin + kBlock - 1) / kBlock;
    auto slot = [&](int64_t c) { return states + ((geo.slot_begin(n, kBlock) + c) * HV + hv) * KV; };
    if (in.initial_state.defined()) load_state(in.initial_state, n, hv, s.S);
    else std::fill(s.S, s.S + KV, Acc(0));
    for (int64_t c = 0; c < num_blocks; ++c) {
      std::copy(s.S, s.S + KV, slot(c));
      if (c + 1 == num_blocks) break;
      const int64_t t0 = seq.begin + c * kBlock;
      run.load(seq.batch, t0, kBlock, hv);
      for (int64_t j = 0; j < kBlock; ++j) run.step(j, s.S, nullptr);
    }
    if (gin.d_final_state.defined()) load_state(gin.d_final_state, n, hv, s.dS);
    else std::fill(s.dS, s.dS + KV, Acc(0));
    for (int64_t c = num_blocks - 1; c >= 0; --c) {
      const int64_t t0 = seq.begin + c * kBlock, L = std::min(kBlock, seq.end - t0);
      run.load(seq.batch, t0, L, hv);
      load_rows(gin.d_o, seq.batch, t0, L, hv, s.d_o);
      std::copy(slot(c), slot(c) + KV, s.history);
      for (int64_t j = 0; j + 1 < L; ++j) {
        std::copy(s.history + j * KV, s.history + (j + 1) * KV, s.history + (j + 1) * KV);
        run.step(j, s.history + (j + 1) * KV, nullptr);
      }
      for (int64_t j = L - 1; j >= 0; --j) run.step_back(j, s.history + j * KV);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t row = ((seq.batch * T + t0 + i) * HV + hv) * K;
        for (int64_t d = 0; d < K; ++d) {
          dq_heads[row + d] = scale * s.dq[i * K + d];
          dk_heads[row + d] = s.dk[i * K + d];
        }
      }
      store_rows(gout.dv, seq.batch, t0, L, hv, s.dv);
      store_rows(gout.dg, seq.batch, t0, L, hv, s.dg);
      store_rows(gout.dbeta, seq.batch, t0, L, hv, s.dbeta);
    }
    if (gout.d_initial_state.defined()) store_state(gout.d_initial_state, n, hv, s.dS);
  });
  reduce_qk_grad(geo, in.q, dq_heads, in.use_qk_l2norm, gout.dq);
  reduce_qk_grad(geo, in.k, dk_heads, in.use_qk_l2norm, gout.dk);
}

bool is_f64(const GatedDeltaRuleInputs& in) { return in.q.dtype == DType::kFloat64; }

size_t forward_workspace_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in) {
  return is_f64(in) ? make_plan<double>(s, in, false).bytes() : make_plan<float>(s, in, false).bytes();
}
size_t backward_workspace_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in) {
  return is_f64(in) ? make_plan<double>(s, in, true).bytes() : make_plan<float>(s, in, true).bytes();
}
void forward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
             const GatedDeltaRuleForwardOutputs& out) {
  is_f64(in) ? forward_impl<double>(s, in, out) : forward_impl<float>(s, in, out);
}
void backward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
              const GatedDeltaRuleBackwardInputs& gin, const GatedDeltaRuleBackwardOutputs& gout) {
  is_f64(in) ? backward_impl<double>(s, in, gin, gout) : backward_impl<float>(s, in, gin, gout);
}

}  // namespace

const ::flashdelta::detail::GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule = {
    forward_workspace_bytes, backward_workspace_bytes, forward, backward};

}  // namespace flashdelta::cpu
