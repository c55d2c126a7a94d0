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

constexpr int64_t kTokensPerState = 64;  // tokens per checkpoint and per load

template <typename Acc>
struct Scratch {
  Acc *q, *k, *v, *g, *beta, *o, *u, *S;      // forward
  Acc *d_o, *dq, *dk, *dv, *dg, *dbeta, *w, *dS, *history;  // backward

  // Lays the scratch out from `base` (or only counts with base == nullptr).
  int64_t carve(Acc* base, int64_t K, int64_t V, bool backward) {
    Arena<Acc> arena{base};
    auto take = [&](int64_t n) { return arena.take(n); };
    const int64_t B = kTokensPerState;
    q = take(B * K), k = take(B * K), v = take(B * V);
    g = take(B), beta = take(B), o = take(B * V), u = take(V), S = take(K * V);
    if (backward) {
      d_o = take(B * V), dq = take(B * K), dk = take(B * K), dv = take(B * V);
      dg = take(B), dbeta = take(B), w = take(V), dS = take(K * V);
      history = take(B * K * V);
    }
    return arena.used;
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
struct FusedRecurrentOp {
  static constexpr int64_t kBlock = kTokensPerState;
  static constexpr bool kKeepsStates = false;  // the decode path: its backward replays

  static int64_t scratch_elems(int64_t K, int64_t V, bool backward) {
    Scratch<Acc> counter;
    return counter.carve(nullptr, K, V, backward);
  }

  static void forward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                      const GatedDeltaRuleForwardOutputs& out, const GdnWorkspace<Acc>& ws,
                      const KeptStates<Acc>&) {
    const int64_t HV = geo.s.num_v_heads, K = geo.s.head_k_dim, V = geo.s.head_v_dim;
    parallel_for(geo.s.num_seqs * HV, [&](int64_t task, int worker) {
      const int64_t n = task / HV, hv = task % HV;
      Scratch<Acc> s;
      s.carve(ws.worker_scratch(worker), K, V, false);
      Runner<Acc> run{geo, in, s, K, V};
      load_state_or_zero(in.initial_state, n, hv, K, V, s.S);
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

  static void backward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                       const GatedDeltaRuleBackwardInputs& gin,
                       const GatedDeltaRuleBackwardOutputs& gout, const GdnWorkspace<Acc>& ws) {
    const int64_t HV = geo.s.num_v_heads, K = geo.s.head_k_dim, V = geo.s.head_v_dim;
    const int64_t KV = K * V;
    parallel_for(geo.s.num_seqs * HV, [&](int64_t task, int worker) {
      const int64_t n = task / HV, hv = task % HV;
      Scratch<Acc> s;
      s.carve(ws.worker_scratch(worker), K, V, true);
      Runner<Acc> run{geo, in, s, K, V};
      const auto seq = geo.seq(n);
      const int64_t num_blocks = (seq.end - seq.begin + kBlock - 1) / kBlock;
      load_state_or_zero(in.initial_state, n, hv, K, V, s.S);
      for (int64_t c = 0; c < num_blocks; ++c) {
        std::copy(s.S, s.S + KV, ws.state(n, c, hv));
        if (c + 1 == num_blocks) break;
        run.load(seq.batch, seq.begin + c * kBlock, kBlock, hv);
        for (int64_t j = 0; j < kBlock; ++j) run.step(j, s.S, nullptr);
      }
      load_state_or_zero(gin.d_final_state, n, hv, K, V, s.dS);
      for (int64_t c = num_blocks - 1; c >= 0; --c) {
        const int64_t t0 = seq.begin + c * kBlock, L = std::min(kBlock, seq.end - t0);
        run.load(seq.batch, t0, L, hv);
        load_rows(gin.d_o, seq.batch, t0, L, hv, s.d_o);
        // history[j] = the state before token j of the block
        std::copy(ws.state(n, c, hv), ws.state(n, c, hv) + KV, s.history);
        for (int64_t j = 0; j + 1 < L; ++j) {
          std::copy(s.history + j * KV, s.history + (j + 1) * KV, s.history + (j + 1) * KV);
          run.step(j, s.history + (j + 1) * KV, nullptr);
        }
        for (int64_t j = L - 1; j >= 0; --j) run.step_back(j, s.history + j * KV);
        store_block_grads(ws, gout, seq.batch, t0, L, hv, s.dq, s.dk, s.dv, s.dg, s.dbeta);
      }
      if (gout.d_initial_state.defined()) store_state(gout.d_initial_state, n, hv, s.dS);
    });
  }
};

}  // namespace

const ::flashdelta::detail::GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule =
    GdnCpuBackend<FusedRecurrentOp>::table();

}  // namespace flashdelta::cpu
