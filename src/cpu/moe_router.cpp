// moe_router on the CPU: per token, fp32 softmax over the experts, top-k by repeated arg-max
// (strictly greater wins, so exact ties go to the lower expert), optional renormalisation; the
// backward recomputes the softmax from the logits. Tokens are split across the thread pool.
#include <cmath>
#include <limits>
#include <vector>

#include "core/moe_backend.h"
#include "cpu/moe_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {

using flashdelta::cpu::parallel_for;
using namespace flashdelta::cpu::moe;

namespace {

constexpr int64_t kTokensPerTask = 64;

// p[e] = softmax(logits[t, :]) in fp32.
void softmax_row(const TensorRef& logits, int64_t t, int64_t E, float* p) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) {
    p[e] = load2(logits, t, e);
    max_logit = std::fmax(max_logit, p[e]);
  }
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(p[e] - max_logit);
    sum += p[e];
  }
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
}

}  // namespace

void moe_router_forward(const MoeRouterShape& s, const MoeRouterInputs& in,
                        const MoeRouterForwardOutputs& out) {
  const int64_t T = s.num_tokens, E = s.num_experts, K = s.top_k;
  int64_t* indices = static_cast<int64_t*>(out.indices.data);
  parallel_for((T + kTokensPerTask - 1) / kTokensPerTask, [&](int64_t task, int) {
    std::vector<float> p(E);
    std::vector<char> taken(E);
    std::vector<float> top(K);
    for (int64_t t = task * kTokensPerTask; t < std::min(T, (task + 1) * kTokensPerTask); ++t) {
      softmax_row(in.logits, t, E, p.data());
      std::fill(taken.begin(), taken.end(), 0);
      float sum = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          // NaN counts as the largest value, as in torch.topk.
          if (!taken[e] && (best < 0 || p[e] > p[best] || (std::isnan(p[e]) && !std::isnan(p[best])))) {
            best = e;
          }
        }
        taken[best] = 1;
        top[j] = p[best];
        indices[t * K + j] = best;
        sum += top[j];
      }
      for (int64_t j = 0; j < K; ++j) {
        store_flat(out.weights, t * K + j, in.normalize ? top[j] / sum : top[j]);
      }
    }
  });
}

void moe_router_backward(const MoeRouterShape& s, const MoeRouterInputs& in,
                         const MoeRouterBackwardArgs& a) {
  const int64_t T = s.num_tokens, E = s.num_experts, K = s.top_k;
  const int64_t* indices = static_cast<const int64_t*>(a.indices.data);
  parallel_for((T + kTokensPerTask - 1) / kTokensPerTask, [&](int64_t task, int) {
    std::vector<float> p(E), d_sel(E);
    std::vector<float> top(K), d_top(K);
    for (int64_t t = task * kTokensPerTask; t < std::min(T, (task + 1) * kTokensPerTask); ++t) {
      softmax_row(in.logits, t, E, p.data());
      float sum = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = indices[t * K + j];
        top[j] = (e >= 0 && e < E) ? p[e] : 0.0f;
        sum += top[j];
      }
      // d(top_j): through w_j = top_j / sum when normalising.
      float dot = 0.0f;  // sum_j d_w_j * w_j
      for (int64_t j = 0; j < K; ++j) {
        d_top[j] = load2(a.d_weights, t, j);
        if (in.normalize) dot += d_top[j] * (top[j] / sum);
      }
      if (in.normalize) {
        for (int64_t j = 0; j < K; ++j) d_top[j] = (d_top[j] - dot) / sum;
      }
      // Through the softmax: d_logit_e = p_e * (d_p_e - sum_j d_top_j * top_j).
      std::fill(d_sel.begin(), d_sel.end(), 0.0f);
      float inner = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t e = indices[t * K + j];
        if (e < 0 || e >= E) continue;
        d_sel[e] += d_top[j];
        inner += d_top[j] * top[j];
      }
      for (int64_t e = 0; e < E; ++e) store_flat(a.d_logits, t * E + e, p[e] * (d_sel[e] - inner));
    }
  });
}

}  // namespace flashdelta::detail::cpu
