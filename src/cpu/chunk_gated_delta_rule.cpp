// Chunked gated delta rule on the CPU, forward and backward.
//
// Algorithm (DESIGN.md, "Gated DeltaNet"): per (sequence, value head) task, chunks of C = 64
// tokens in order, with gamma the within-chunk cumsum of g, Gamma_ij = exp(gamma_i - gamma_j):
//   A  = strictLower(diag(b) (Gamma * K K^T)),  T = (I + A)^-1 (forward substitution)
//   W  = T diag(b e^gamma) K,  U = T diag(b) V,  Vn = U - W S
//   O  = diag(e^gamma) Q S + (Gamma * causal(Q K^T)) Vn         (Q already scaled)
//   S' = e^gamma_last S + K^T diag(e^(gamma_last - gamma)) Vn
// Every exponent is of a difference gamma_i - gamma_j with i >= j or of gamma itself, so
// nothing overflows for g <= 0. The backward first replays the chunk recurrence to store each
// chunk's incoming state (workspace "slots"; a training forward keeps them in the op's `saved`
// instead, and the backward then skips the replay), then walks the chunks in reverse carrying dS,
// recomputing A, T, W, U, Vn for one chunk at a time; each line below cites the forward line it
// differentiates. Products run through gemm.h on per-worker scratch carved from the caller's
// workspace; dq/dk are reduced over value heads afterwards (gated_delta_rule_common.h).
#include <algorithm>
#include <cmath>

#include "flashdelta/chunk_gated_delta_rule.h"
#include "gated_delta_rule_common.h"
#include "gated_delta_rule_cpu.h"

namespace flashdelta::cpu {
namespace {

constexpr int64_t C = kGdnChunkSize;
constexpr double kMinLogDecay = -1e4;  // exp(-1e4) == 0 in double

template <typename Acc>
struct ChunkScratch {
  // forward
  Acc *q, *k, *v, *gam, *beta, *e, *G, *A, *KKg, *T, *Kb, *Vb, *W, *U, *Vn, *M, *O, *S, *pack;
  // backward only
  Acc *dO, *dS, *dSn, *KdS, *dVn, *dM, *dOS, *dQ, *dK, *dW, *dT, *dVb, *dKb, *tmp, *dA, *VndS,
      *dgam, *dr, *de, *Qe, *dbeta, *dv;

  int64_t carve(Arena<Acc>& a, int64_t K, int64_t V, bool backward) {
    const int64_t P = std::max({C, K, V});
    for (Acc** p : {&q, &k, &Kb, &W}) *p = a.take(C * K);
    for (Acc** p : {&v, &Vb, &U, &Vn, &O}) *p = a.take(C * V);
    for (Acc** p : {&gam, &beta, &e}) *p = a.take(C);
    for (Acc** p : {&G, &A, &KKg, &T, &M}) *p = a.take(C * C);
    S = a.take(K * V);
    pack = a.take(P * P);
    if (backward) {
      for (Acc** p : {&dO, &KdS, &dVn, &dVb, &dv}) *p = a.take(C * V);
      for (Acc** p : {&dS, &dSn}) *p = a.take(K * V);
      for (Acc** p : {&dOS, &dQ, &dK, &dW, &dKb, &VndS, &Qe}) *p = a.take(C * K);
      for (Acc** p : {&dM, &dT, &tmp, &dA}) *p = a.take(C * C);
      for (Acc** p : {&dgam, &dr, &de, &dbeta}) *p = a.take(C);
    }
    return a.used;
  }
};

template <typename Acc>
struct ChunkRunner {
  const GdnGeometry& geo;
  const GatedDeltaRuleInputs& in;
  ChunkScratch<Acc>& s;
  int64_t K, V;
  // current chunk
  int64_t batch = 0, t0 = 0, L = 0, hv = 0, hk = 0;

  ChunkRunner(const GdnGeometry& g, const GatedDeltaRuleInputs& i, ChunkScratch<Acc>& scratch)
      : geo(g), in(i), s(scratch), K(g.s.head_k_dim), V(g.s.head_v_dim) {}

  Mat<Acc> mat(Acc* p, int64_t rows, int64_t cols) const { return Mat<Acc>(p, rows, cols); }

  // Loads chunk rows [t0, t0 + L) of value head hv: q (normalised, scaled), k, v, gamma, beta.
  void load(int64_t b, int64_t start, int64_t len, int64_t head, bool with_q) {
    batch = b, t0 = start, L = len, hv = head, hk = head / geo.group;
    load_rows(in.k, b, t0, L, hk, s.k);
    if (in.use_qk_l2norm) l2norm_rows(s.k, L, K);
    if (with_q) {
      load_rows(in.q, b, t0, L, hk, s.q);
      if (in.use_qk_l2norm) l2norm_rows(s.q, L, K);
      const Acc scale = static_cast<Acc>(geo.s.scale);
      for (int64_t i = 0; i < L * K; ++i) s.q[i] *= scale;
    }
    load_rows(in.v, b, t0, L, hv, s.v);
    load_rows(in.g, b, t0, L, hv, s.gam);
    load_rows(in.beta, b, t0, L, hv, s.beta);
    // gamma in double: the gates exp(gamma_i - gamma_j) are differences of partial sums that
    // can be large after strong decay. g is floored at kMinLogDecay, where exp() is exactly 0
    // already, so that g = -inf (a hard reset) gives -inf - -inf = NaN nowhere; NaN passes.
    double gamma[C];
    double sum = 0;
    for (int64_t i = 0; i < L; ++i) {
      const double g = static_cast<double>(s.gam[i]);
      sum += g < kMinLogDecay ? kMinLogDecay : g;
      gamma[i] = sum;
      s.e[i] = static_cast<Acc>(std::exp(sum));
    }
    for (int64_t i = 0; i < L; ++i)  // Gamma, lower triangle (diagonal = 1)
      for (int64_t j = 0; j <= i; ++j) s.G[i * L + j] = static_cast<Acc>(std::exp(gamma[i] - gamma[j]));
  }

  // Gamma_ij = exp(gamma_i - gamma_j), j <= i (computed once per chunk in load()).
  Acc gate(int64_t i, int64_t j) const { return s.G[i * L + j]; }

  // A, KKg = Gamma * K K^T (strictly lower), T = (I + A)^-1, Kb, Vb, W = T Kb, U = T Vb.
  void prepare() {
    gemm(mat(s.KKg, L, L), mat(s.k, L, K), mat(s.k, L, K).t(), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        const Acc kkg = j < i ? gate(i, j) * s.KKg[i * L + j] : Acc(0);
        s.KKg[i * L + j] = kkg;
        s.A[i * L + j] = s.beta[i] * kkg;
      }
    }
    // (I + A) T = I, row by row: T_i = e_i - sum_{m < i} A_im T_m (T_m is zero beyond m).
    for (int64_t i = 0; i < L; ++i) {
      Acc* ti = s.T + i * L;
      std::fill(ti, ti + L, Acc(0));
      ti[i] = 1;
      for (int64_t m = 0; m < i; ++m) {
        const Acc a = s.A[i * L + m];
        const Acc* tm = s.T + m * L;
        for (int64_t j = 0; j <= m; ++j) ti[j] -= a * tm[j];
      }
    }
    for (int64_t i = 0; i < L; ++i) {
      const Acc be = s.beta[i] * s.e[i];
      for (int64_t d = 0; d < K; ++d) s.Kb[i * K + d] = be * s.k[i * K + d];
      for (int64_t d = 0; d < V; ++d) s.Vb[i * V + d] = s.beta[i] * s.v[i * V + d];
    }
    gemm(mat(s.W, L, K), mat(s.T, L, L), mat(s.Kb, L, K), Acc(1), false, s.pack);
    gemm(mat(s.U, L, V), mat(s.T, L, L), mat(s.Vb, L, V), Acc(1), false, s.pack);
  }

  // Vn = U - W S
  void new_values(const Acc* S) {
    std::copy(s.U, s.U + L * V, s.Vn);
    gemm(mat(s.Vn, L, V), mat(s.W, L, K), mat(const_cast<Acc*>(S), K, V), Acc(-1), true, s.pack);
  }

  // M = Gamma * causal(Q K^T), diagonal included.
  void intra_scores() {
    gemm(mat(s.M, L, L), mat(s.q, L, K), mat(s.k, L, K).t(), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < L; ++j) s.M[i * L + j] = j <= i ? gate(i, j) * s.M[i * L + j] : 0;
  }

  // O = diag(e) Q S + M Vn
  void output(const Acc* S) {
    gemm(mat(s.O, L, V), mat(s.q, L, K), mat(const_cast<Acc*>(S), K, V), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i)
      for (int64_t d = 0; d < V; ++d) s.O[i * V + d] *= s.e[i];
    intra_scores();
    gemm(mat(s.O, L, V), mat(s.M, L, L), mat(s.Vn, L, V), Acc(1), true, s.pack);
  }

  // S <- e_last S + K^T diag(r) Vn, r_i = exp(gamma_last - gamma_i). Uses Kb as scratch.
  void advance_state(Acc* S) {
    const Acc e_last = s.e[L - 1];
    for (int64_t i = 0; i < K * V; ++i) S[i] *= e_last;
    for (int64_t i = 0; i < L; ++i) {
      const Acc r = gate(L - 1, i);
      for (int64_t d = 0; d < K; ++d) s.Kb[i * K + d] = r * s.k[i * K + d];
    }
    gemm(mat(S, K, V), mat(s.Kb, L, K).t(), mat(s.Vn, L, V), Acc(1), true, s.pack);
  }

  // Gradients of one chunk. In: S (incoming state), s.dS (gradient of the outgoing state),
  // s.dO. Out: s.dQ (w.r.t. scaled, normalised q), s.dK (normalised k), s.dv, s.dbeta, s.dgam
  // (then turned into dg), s.dSn (gradient of the incoming state).
  void backward(const Acc* S) {
    prepare();
    new_values(S);
    intra_scores();
    const Mat<Acc> Q = mat(s.q, L, K), Km = mat(s.k, L, K), Sm = mat(const_cast<Acc*>(S), K, V);
    const Mat<Acc> dS = mat(s.dS, K, V), dO = mat(s.dO, L, V), Vn = mat(s.Vn, L, V);
    std::fill(s.dgam, s.dgam + L, Acc(0));
    std::fill(s.dbeta, s.dbeta + L, Acc(0));
    std::fill(s.de, s.de + L, Acc(0));
    const Acc e_last = s.e[L - 1];

    // S' = e_last S + K^T diag(r) Vn  and  O = ... + M Vn:  dVn = M^T dO + diag(r) K dS'
    gemm(mat(s.KdS, L, V), Km, dS, Acc(1), false, s.pack);
    gemm(mat(s.dVn, L, V), mat(s.M, L, L).t(), dO, Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      const Acc r = gate(L - 1, i);
      Acc dr = 0;
      for (int64_t d = 0; d < V; ++d) {
        s.dVn[i * V + d] += r * s.KdS[i * V + d];
        dr += s.KdS[i * V + d] * s.Vn[i * V + d];
      }
      s.dr[i] = dr;  // d r_i = k_i^T dS' vn_i
    }
    // O = M Vn, M = Gamma * causal(Q K^T): dM = dO Vn^T; gamma gets dM * M (row +, column -).
    gemm(mat(s.dM, L, L), dO, Vn.t(), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        Acc& dm = s.dM[i * L + j];
        if (j > i) {
          dm = 0;
          continue;
        }
        const Acc x = dm * s.M[i * L + j];
        s.dgam[i] += x;
        s.dgam[j] -= x;
        dm *= gate(i, j);  // now dM * Gamma, the gradient of Q K^T
      }
    }
    // O = diag(e) Q S: dQ = diag(e) dO S^T + (dM * Gamma) K; de_i = (dO S^T)_i . q_i
    gemm(mat(s.dOS, L, K), dO, Sm.t(), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      Acc de = 0;
      for (int64_t d = 0; d < K; ++d) {
        de += s.dOS[i * K + d] * s.q[i * K + d];
        s.dQ[i * K + d] = s.e[i] * s.dOS[i * K + d];
      }
      s.de[i] += de;
    }
    gemm(mat(s.dQ, L, K), mat(s.dM, L, L), Km, Acc(1), true, s.pack);
    // dK = (dM * Gamma)^T Q + diag(r) Vn dS'^T
    gemm(mat(s.dK, L, K), mat(s.dM, L, L).t(), Q, Acc(1), false, s.pack);
    gemm(mat(s.VndS, L, K), Vn, dS.t(), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      const Acc r = gate(L - 1, i);
      for (int64_t d = 0; d < K; ++d) s.dK[i * K + d] += r * s.VndS[i * K + d];
    }
    // dS_in = e_last dS' + (diag(e) Q)^T dO - W^T dVn   (from S', O and Vn = U - W S)
    Acc de_last = 0;
    for (int64_t i = 0; i < K * V; ++i) {
      de_last += S[i] * s.dS[i];
      s.dSn[i] = e_last * s.dS[i];
    }
    for (int64_t i = 0; i < L; ++i)
      for (int64_t d = 0; d < K; ++d) s.Qe[i * K + d] = s.e[i] * s.q[i * K + d];
    gemm(mat(s.dSn, K, V), mat(s.Qe, L, K).t(), dO, Acc(1), true, s.pack);
    gemm(mat(s.dSn, K, V), mat(s.W, L, K).t(), mat(s.dVn, L, V), Acc(-1), true, s.pack);
    // Vn = U - W S: dU = dVn, dW = -dVn S^T
    gemm(mat(s.dW, L, K), mat(s.dVn, L, V), Sm.t(), Acc(-1), false, s.pack);
    // U = T Vb, W = T Kb: dT = dU Vb^T + dW Kb^T, dVb = T^T dU, dKb = T^T dW
    gemm(mat(s.dT, L, L), mat(s.dVn, L, V), mat(s.Vb, L, V).t(), Acc(1), false, s.pack);
    gemm(mat(s.dT, L, L), mat(s.dW, L, K), mat(s.Kb, L, K).t(), Acc(1), true, s.pack);
    gemm(mat(s.dVb, L, V), mat(s.T, L, L).t(), mat(s.dVn, L, V), Acc(1), false, s.pack);
    gemm(mat(s.dKb, L, K), mat(s.T, L, L).t(), mat(s.dW, L, K), Acc(1), false, s.pack);
    for (int64_t i = 0; i < L; ++i) {
      Acc dbv = 0;  // Vb = diag(b) V
      for (int64_t d = 0; d < V; ++d) {
        s.dv[i * V + d] = s.beta[i] * s.dVb[i * V + d];
        dbv += s.dVb[i * V + d] * s.v[i * V + d];
      }
      Acc dbe = 0;  // Kb = diag(b e) K
      const Acc be = s.beta[i] * s.e[i];
      for (int64_t d = 0; d < K; ++d) {
        dbe += s.dKb[i * K + d] * s.k[i * K + d];
        s.dK[i * K + d] += be * s.dKb[i * K + d];
      }
      s.dbeta[i] += dbv + s.e[i] * dbe;
      s.de[i] += s.beta[i] * dbe;
    }
    // T = (I + A)^-1: dA = -T^T dT T^T, strictly lower
    gemm(mat(s.tmp, L, L), mat(s.T, L, L).t(), mat(s.dT, L, L), Acc(1), false, s.pack);
    gemm(mat(s.dA, L, L), mat(s.tmp, L, L), mat(s.T, L, L).t(), Acc(-1), false, s.pack);
    // A_ij = b_i Gamma_ij k_i.k_j (i > j): db, dgamma, and Z = dA b Gamma = d(k_i . k_j)
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        Acc& da = s.dA[i * L + j];
        if (j >= i) {
          da = 0;
          continue;
        }
        s.dbeta[i] += da * s.KKg[i * L + j];
        const Acc x = da * s.A[i * L + j];
        s.dgam[i] += x;
        s.dgam[j] -= x;
        da *= s.beta[i] * gate(i, j);
      }
    }
    gemm(mat(s.dK, L, K), mat(s.dA, L, L), Km, Acc(1), true, s.pack);
    gemm(mat(s.dK, L, K), mat(s.dA, L, L).t(), Km, Acc(1), true, s.pack);
    // e_i = exp(gamma_i), r_i = exp(gamma_last - gamma_i), e_last; then dg = reverse cumsum.
    Acc dlast = de_last * e_last;
    for (int64_t i = 0; i < L; ++i) {
      const Acc rdr = s.dr[i] * gate(L - 1, i);
      s.dgam[i] += s.de[i] * s.e[i] - rdr;
      dlast += rdr;
    }
    s.dgam[L - 1] += dlast;
    for (int64_t i = L - 2; i >= 0; --i) s.dgam[i] += s.dgam[i + 1];
  }
};

template <typename Acc>
struct ChunkOp {
  static constexpr int64_t kBlock = C;
  static constexpr bool kKeepsStates = true;  // the forward's chunk states spare the replay

  static int64_t scratch_elems(int64_t K, int64_t V, bool backward) {
    Arena<Acc> counter;
    ChunkScratch<Acc> s;
    return s.carve(counter, K, V, backward);
  }

  static void forward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                      const GatedDeltaRuleForwardOutputs& out, const GdnWorkspace<Acc>& ws,
                      const KeptStates<Acc>& kept) {
    const int64_t HV = geo.s.num_v_heads, K = geo.s.head_k_dim, V = geo.s.head_v_dim;
    parallel_for(geo.s.num_seqs * HV, [&](int64_t task, int worker) {
      const int64_t n = task / HV, hv = task % HV;
      Arena<Acc> arena{ws.worker_scratch(worker)};
      ChunkScratch<Acc> s;
      s.carve(arena, K, V, false);
      ChunkRunner<Acc> run(geo, in, s);
      load_state_or_zero(in.initial_state, n, hv, K, V, s.S);
      const auto seq = geo.seq(n);
      for (int64_t t0 = seq.begin; t0 < seq.end; t0 += C) {
        if (kept.base) std::copy(s.S, s.S + K * V, kept.state(n, (t0 - seq.begin) / C, hv));
        run.load(seq.batch, t0, std::min(C, seq.end - t0), hv, true);
        run.prepare();
        run.new_values(s.S);
        run.output(s.S);
        store_rows(out.o, seq.batch, t0, run.L, hv, s.O);
        run.advance_state(s.S);
      }
      if (out.final_state.defined()) store_state(out.final_state, n, hv, s.S);
      if (kept.base) kept.zero_unused(n, hv, (seq.end - seq.begin + C - 1) / C);
    });
  }

  static void backward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                       const GatedDeltaRuleBackwardInputs& gin,
                       const GatedDeltaRuleBackwardOutputs& gout, const GdnWorkspace<Acc>& ws) {
    const int64_t HV = geo.s.num_v_heads, K = geo.s.head_k_dim, V = geo.s.head_v_dim;
    parallel_for(geo.s.num_seqs * HV, [&](int64_t task, int worker) {
      const int64_t n = task / HV, hv = task % HV;
      Arena<Acc> arena{ws.worker_scratch(worker)};
      ChunkScratch<Acc> s;
      s.carve(arena, K, V, true);
      ChunkRunner<Acc> run(geo, in, s);
      const auto seq = geo.seq(n);
      const int64_t num_chunks = (seq.end - seq.begin + C - 1) / C;
      // Replay the recurrence, keeping every chunk's incoming state (unless the forward kept
      // them: the same states, bitwise, from the same steps).
      load_state_or_zero(in.initial_state, n, hv, K, V, s.S);
      for (int64_t c = 0; c < (ws.kept_states != nullptr ? 0 : num_chunks); ++c) {
        std::copy(s.S, s.S + K * V, ws.state(n, c, hv));
        if (c + 1 == num_chunks) break;  // the last chunk's outgoing state is not needed
        const int64_t t0 = seq.begin + c * C;
        run.load(seq.batch, t0, std::min(C, seq.end - t0), hv, false);
        run.prepare();
        run.new_values(s.S);
        run.advance_state(s.S);
      }
      load_state_or_zero(gin.d_final_state, n, hv, K, V, s.dS);
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t t0 = seq.begin + c * C, L = std::min(C, seq.end - t0);
        run.load(seq.batch, t0, L, hv, true);
        load_rows(gin.d_o, seq.batch, t0, L, hv, s.dO);
        run.backward(ws.state(n, c, hv));
        store_block_grads(ws, gout, seq.batch, t0, L, hv, s.dQ, s.dK, s.dv, s.dgam, s.dbeta);
        std::swap(s.dS, s.dSn);
      }
      if (gout.d_initial_state.defined()) store_state(gout.d_initial_state, n, hv, s.dS);
    });
  }
};

}  // namespace

const ::flashdelta::detail::GatedDeltaRuleBackend kChunkGatedDeltaRule =
    GdnCpuBackend<ChunkOp>::table();

}  // namespace flashdelta::cpu
