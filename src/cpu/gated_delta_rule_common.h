// What the CPU gated delta rule ops (chunked and token-by-token) share: the problem's geometry
// (sequences, heads, where each sequence's rows live), strided loads and stores with dtype
// conversion, the q/k l2-normalisation and the final reduction of dq/dk over value heads.
//
// Both ops run one task per (sequence, value head) and compute in Acc (float for
// f32/f16/bf16 inputs, double for f64). Per-value-head dq/dk go to an Acc workspace
// [B*T, HV, K] and are summed over the HV/H value heads of each key head afterwards, in a fixed
// order, then l2norm-backpropagated and cast: deterministic, no atomics.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../core/gated_delta_rule_backend.h"
#include "convert.h"
#include "flashdelta/gated_delta_rule.h"
#include "gemm.h"
#include "parallel.h"

namespace flashdelta::cpu {

constexpr double kL2NormEps = 1e-6;

// Calls f(Storage*) with the tensor's data pointer typed by its dtype.
template <typename F>
void visit_float(const TensorRef& t, F&& f) {
  switch (t.dtype) {
    case DType::kFloat32: f(static_cast<float*>(t.data)); break;
    case DType::kFloat64: f(static_cast<double*>(t.data)); break;
    case DType::kBFloat16: f(static_cast<bf16*>(t.data)); break;
    case DType::kFloat16: f(static_cast<f16*>(t.data)); break;
    default: break;  // validated before reaching the backend
  }
}

struct GdnGeometry {
  GatedDeltaRuleShape s;
  const TensorRef* cu_seqlens = nullptr;  // nullptr when not varlen
  int64_t group = 1;                      // value heads per key head, HV / H

  explicit GdnGeometry(const GatedDeltaRuleShape& shape, const GatedDeltaRuleInputs& in)
      : s(shape), cu_seqlens(in.cu_seqlens.defined() ? &in.cu_seqlens : nullptr),
        group(shape.num_v_heads / shape.num_heads) {}

  int64_t offset(int64_t i) const {
    return cu_seqlens->dtype == DType::kInt32 ? static_cast<const int32_t*>(cu_seqlens->data)[i]
                                              : static_cast<const int64_t*>(cu_seqlens->data)[i];
  }
  // Sequence n occupies rows [begin, end) of batch row `batch` (time index within that row).
  struct Seq { int64_t batch, begin, end; };
  Seq seq(int64_t n) const {
    if (cu_seqlens) return {0, offset(n), offset(n + 1)};
    return {n, 0, s.seq_len};
  }
  // Chunk-state slots (one [K, V] state per chunk start): sequence n's chunks use slots
  // [slot_begin(n), slot_begin(n) + ceil(len / chunk)). floor(cu[n] / C) + n never overlaps.
  int64_t slot_begin(int64_t n, int64_t chunk) const {
    if (cu_seqlens) return offset(n) / chunk + n;
    return n * ((s.seq_len + chunk - 1) / chunk);
  }
  int64_t num_slots(int64_t chunk) const {
    if (cu_seqlens) return s.seq_len / chunk + s.num_seqs;
    return s.batch * ((s.seq_len + chunk - 1) / chunk);
  }
};

// Copies rows [t0, t0 + L) of head h of batch row b of a [B, T, H, D] tensor into dst
// (L x D, row-major, Acc). Three-index tensors [B, T, H] give one value per row (D = 1).
template <typename Acc>
void load_rows(const TensorRef& t, int64_t b, int64_t t0, int64_t L, int64_t h, Acc* dst) {
  const int64_t D = t.rank == 4 ? t.shape[3] : 1;
  const int64_t sd = t.rank == 4 ? t.strides[3] : 1;
  visit_float(t, [&](auto* data) {
    for (int64_t i = 0; i < L; ++i) {
      const auto* src = data + b * t.strides[0] + (t0 + i) * t.strides[1] + h * t.strides[2];
      for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<Acc>(to_float(src[d * sd]));
    }
  });
}

template <typename Acc>
void store_rows(const TensorRef& t, int64_t b, int64_t t0, int64_t L, int64_t h, const Acc* src) {
  const int64_t D = t.rank == 4 ? t.shape[3] : 1;
  const int64_t sd = t.rank == 4 ? t.strides[3] : 1;
  visit_float(t, [&](auto* data) {
    using Storage = std::remove_pointer_t<decltype(data)>;
    for (int64_t i = 0; i < L; ++i) {
      auto* dst = data + b * t.strides[0] + (t0 + i) * t.strides[1] + h * t.strides[2];
      for (int64_t d = 0; d < D; ++d) dst[d * sd] = from_float<Storage>(src[i * D + d]);
    }
  });
}

// A [N, HV, K, V] state tensor's (n, h) matrix to/from a contiguous K x V Acc buffer.
template <typename Acc>
void load_state(const TensorRef& t, int64_t n, int64_t h, Acc* dst) {
  const int64_t K = t.shape[2], V = t.shape[3];
  visit_float(t, [&](auto* data) {
    for (int64_t i = 0; i < K; ++i) {
      const auto* src = data + n * t.strides[0] + h * t.strides[1] + i * t.strides[2];
      for (int64_t j = 0; j < V; ++j) dst[i * V + j] = static_cast<Acc>(to_float(src[j * t.strides[3]]));
    }
  });
}

template <typename Acc>
void store_state(const TensorRef& t, int64_t n, int64_t h, const Acc* src) {
  const int64_t K = t.shape[2], V = t.shape[3];
  visit_float(t, [&](auto* data) {
    using Storage = std::remove_pointer_t<decltype(data)>;
    for (int64_t i = 0; i < K; ++i) {
      auto* dst = data + n * t.strides[0] + h * t.strides[1] + i * t.strides[2];
      for (int64_t j = 0; j < V; ++j) dst[j * t.strides[3]] = from_float<Storage>(src[i * V + j]);
    }
  });
}

// The (n, h) matrix of an optional state tensor, or zeros when it is absent.
template <typename Acc>
void load_state_or_zero(const TensorRef& t, int64_t n, int64_t h, int64_t K, int64_t V, Acc* dst) {
  if (t.defined()) load_state(t, n, h, dst);
  else std::fill(dst, dst + K * V, Acc(0));
}

// In place: each of the L rows of x (L x D) becomes x / sqrt(|x|^2 + eps).
template <typename Acc>
void l2norm_rows(Acc* x, int64_t L, int64_t D) {
  for (int64_t i = 0; i < L; ++i) {
    Acc ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += x[i * D + d] * x[i * D + d];
    const Acc inv = Acc(1) / std::sqrt(ss + Acc(kL2NormEps));
    for (int64_t d = 0; d < D; ++d) x[i * D + d] *= inv;
  }
}

// Hands out consecutive, 64-byte aligned pieces of a worker's scratch. With base == nullptr it
// only counts, which is how the workspace size is computed: one layout, two uses.
template <typename Acc>
struct Arena {
  Acc* base = nullptr;
  int64_t used = 0;
  Acc* take(int64_t n) {
    Acc* p = base ? base + used : nullptr;
    used += (n + 15) / 16 * 16;
    return p;
  }
};

// The caller's workspace for one call, in Acc elements: one scratch slice per worker, then for
// the backward the chunk-start states ([slots, HV, K, V], slot layout of GdnGeometry) and the
// per-value-head dq and dk ([B*T, HV, K] each). With data == nullptr it only sizes.
template <typename Acc>
struct GdnWorkspace {
  const GdnGeometry& geo;
  int64_t block;     // tokens per stored state
  int64_t scratch;   // per worker
  int64_t workers;
  int64_t states;    // elements of the stored states (in the workspace unless kept_states)
  int64_t qk_grads;
  Acc* base;
  Acc* kept_states;  // the forward's kept states (the op's `saved`), or nullptr: in the workspace

  // Elements of the states stored every `tokens_per_state` tokens.
  static int64_t state_elems(const GdnGeometry& g, int64_t tokens_per_state) {
    return g.num_slots(tokens_per_state) * g.s.num_v_heads * g.s.head_k_dim * g.s.head_v_dim;
  }

  GdnWorkspace(const GdnGeometry& g, int64_t scratch_per_worker, int64_t tokens_per_state,
               bool backward, void* data = nullptr, void* kept = nullptr)
      : geo(g), block(tokens_per_state), scratch(scratch_per_worker),
        workers(std::min<int64_t>(num_threads(),
                                  std::max<int64_t>(1, g.s.num_seqs * g.s.num_v_heads))),
        states(backward ? state_elems(g, tokens_per_state) : 0),
        qk_grads(backward ? g.s.batch * g.s.seq_len * g.s.num_v_heads * g.s.head_k_dim : 0),
        base(static_cast<Acc*>(data)), kept_states(static_cast<Acc*>(kept)) {}

  int64_t own_states() const { return kept_states != nullptr ? 0 : states; }
  size_t bytes() const {
    return static_cast<size_t>(scratch * workers + own_states() + 2 * qk_grads) * sizeof(Acc);
  }
  Acc* worker_scratch(int worker) const { return base + worker * scratch; }
  // The state stored before block c of sequence n, value head hv.
  Acc* state(int64_t n, int64_t c, int64_t hv) const {
    const int64_t KV = geo.s.head_k_dim * geo.s.head_v_dim;
    Acc* const first = kept_states != nullptr ? kept_states : base + scratch * workers;
    return first + ((geo.slot_begin(n, block) + c) * geo.s.num_v_heads + hv) * KV;
  }
  Acc* dq_heads() const { return base + scratch * workers + own_states(); }
  Acc* dk_heads() const { return dq_heads() + qk_grads; }
};

// Where a forward that keeps its states (the op's `saved`) writes them: the backward's layout
// (GdnWorkspace::state), every `block` tokens. Slots between one sequence's last and the next
// sequence's first (varlen) are zeroed, so that the kept bytes are all written.
template <typename Acc>
struct KeptStates {
  const GdnGeometry& geo;
  int64_t block;
  Acc* base;  // nullptr: not kept

  Acc* state(int64_t n, int64_t c, int64_t hv) const {
    const int64_t KV = geo.s.head_k_dim * geo.s.head_v_dim;
    return base + ((geo.slot_begin(n, block) + c) * geo.s.num_v_heads + hv) * KV;
  }
  // Zeroes value head hv's slots of sequence n past its num_chunks used ones.
  void zero_unused(int64_t n, int64_t hv, int64_t num_chunks) const {
    const int64_t end = n + 1 < geo.s.num_seqs ? geo.slot_begin(n + 1, block)
                                                : geo.num_slots(block);
    const int64_t KV = geo.s.head_k_dim * geo.s.head_v_dim;
    for (int64_t slot = geo.slot_begin(n, block) + num_chunks; slot < end; ++slot) {
      Acc* p = base + (slot * geo.s.num_v_heads + hv) * KV;
      std::fill(p, p + KV, Acc(0));
    }
  }
};

// Gradients of rows [t0, t0 + L) of value head hv: dq (w.r.t. the scaled, normalised q: times
// scale) and dk (normalised k) into the workspace's per-value-head rows; dv, dg, dbeta stored.
template <typename Acc>
void store_block_grads(const GdnWorkspace<Acc>& ws, const GatedDeltaRuleBackwardOutputs& gout,
                       int64_t b, int64_t t0, int64_t L, int64_t hv, const Acc* dq,
                       const Acc* dk, const Acc* dv, const Acc* dg, const Acc* dbeta) {
  const GatedDeltaRuleShape& s = ws.geo.s;
  const int64_t K = s.head_k_dim;
  const Acc scale = static_cast<Acc>(s.scale);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t row = ((b * s.seq_len + t0 + i) * s.num_v_heads + hv) * K;
    for (int64_t d = 0; d < K; ++d) {
      ws.dq_heads()[row + d] = scale * dq[i * K + d];
      ws.dk_heads()[row + d] = dk[i * K + d];
    }
  }
  store_rows(gout.dv, b, t0, L, hv, dv);
  store_rows(gout.dg, b, t0, L, hv, dg);
  store_rows(gout.dbeta, b, t0, L, hv, dbeta);
}

// Sums per-value-head gradients ws [B*T, HV, K] over each key head's HV/H value heads (into
// the first head's slot of ws, in a fixed order), backpropagates through the l2-normalisation
// of `input` when asked, and stores into `grad` ([B, T, H, K], input's dtype).
template <typename Acc>
void reduce_qk_grad(const GdnGeometry& geo, const TensorRef& input, Acc* ws, bool l2norm,
                    const TensorRef& grad) {
  const int64_t B = geo.s.batch, T = geo.s.seq_len, H = geo.s.num_heads;
  const int64_t HV = geo.s.num_v_heads, K = geo.s.head_k_dim, r = geo.group;
  constexpr int64_t kRowsPerTask = 64;
  const int64_t blocks = (T + kRowsPerTask - 1) / kRowsPerTask;
  visit_float(input, [&](auto* in_data) {
    using Storage = std::remove_pointer_t<decltype(in_data)>;
    Storage* out_data = static_cast<Storage*>(grad.data);
    parallel_for(B * H * blocks, [&](int64_t task, int) {
      const int64_t b = task / (H * blocks), h = (task / blocks) % H, blk = task % blocks;
      const int64_t t_end = std::min(T, (blk + 1) * kRowsPerTask);
      for (int64_t t = blk * kRowsPerTask; t < t_end; ++t) {
        Acc* g = ws + ((b * T + t) * HV + h * r) * K;
        for (int64_t j = 1; j < r; ++j)
          for (int64_t d = 0; d < K; ++d) g[d] += g[j * K + d];
        const Storage* x = in_data + b * input.strides[0] + t * input.strides[1] +
                           h * input.strides[2];
        Storage* out = out_data + b * grad.strides[0] + t * grad.strides[1] + h * grad.strides[2];
        const int64_t xs = input.strides[3], os = grad.strides[3];
        if (!l2norm) {
          for (int64_t d = 0; d < K; ++d) out[d * os] = from_float<Storage>(g[d]);
          continue;
        }
        // y = x * inv, inv = (|x|^2 + eps)^-1/2:  dx = inv * (dy - y (y . dy))
        Acc ss = 0, xdot = 0;
        for (int64_t d = 0; d < K; ++d) {
          const Acc xd = static_cast<Acc>(to_float(x[d * xs]));
          ss += xd * xd;
          xdot += xd * g[d];
        }
        const Acc inv = Acc(1) / std::sqrt(ss + Acc(kL2NormEps));
        const Acc ydot = xdot * inv;
        for (int64_t d = 0; d < K; ++d) {
          const Acc xd = static_cast<Acc>(to_float(x[d * xs]));
          out[d * os] = from_float<Storage>(inv * (g[d] - xd * inv * ydot));
        }
      }
    });
  });
}

// A backend table from an op class template Op<Acc> (Acc = float for f32/f16/bf16 inputs,
// double for f64) providing: kBlock (tokens per stored state), kKeepsStates (whether its forward
// can keep the states for the backward: then forward's KeptStates may be set, and backward's
// ws.kept_states means they were), scratch_elems(K, V, backward), forward(geo, in, out, ws,
// kept) and backward(geo, in, gin, gout, ws).
template <template <typename> class Op>
struct GdnCpuBackend {
  static constexpr bool kKeepsStates = Op<float>::kKeepsStates;

  template <typename Acc>
  static GdnWorkspace<Acc> workspace(const GdnGeometry& geo, bool backward, void* data,
                                     void* kept = nullptr) {
    return GdnWorkspace<Acc>(geo, Op<Acc>::scratch_elems(geo.s.head_k_dim, geo.s.head_v_dim, backward),
                             Op<Acc>::kBlock, backward, data, kept);
  }
  static bool f64(const GatedDeltaRuleInputs& in) { return in.q.dtype == DType::kFloat64; }
  // with_saved: the backward's workspace when the states come from the forward's `saved`.
  template <typename Acc>
  static size_t bytes_of(const GdnGeometry& geo, bool backward, bool with_saved) {
    const GdnWorkspace<Acc> ws = workspace<Acc>(geo, backward, nullptr);
    return ws.bytes() - (with_saved ? static_cast<size_t>(ws.states) * sizeof(Acc) : 0);
  }
  static size_t bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in, bool backward,
                      bool with_saved = false) {
    const GdnGeometry geo(s, in);
    return f64(in) ? bytes_of<double>(geo, backward, with_saved)
                   : bytes_of<float>(geo, backward, with_saved);
  }
  static size_t saved_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in) {
    const GdnGeometry geo(s, in);
    const int64_t elems = GdnWorkspace<float>::state_elems(geo, Op<float>::kBlock);
    return static_cast<size_t>(elems) * (f64(in) ? sizeof(double) : sizeof(float));
  }
  template <typename Acc>
  static void run_forward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                          const GatedDeltaRuleForwardOutputs& out) {
    const KeptStates<Acc> kept{geo, Op<Acc>::kBlock,
                               kKeepsStates && out.saved.defined()
                                   ? static_cast<Acc*>(out.saved.data)
                                   : nullptr};
    Op<Acc>::forward(geo, in, out, workspace<Acc>(geo, false, out.workspace.data), kept);
  }
  template <typename Acc>
  static void run_backward(const GdnGeometry& geo, const GatedDeltaRuleInputs& in,
                           const GatedDeltaRuleBackwardInputs& gin,
                           const GatedDeltaRuleBackwardOutputs& gout) {
    void* const kept = kKeepsStates && gin.saved.defined() ? gin.saved.data : nullptr;
    const GdnWorkspace<Acc> ws = workspace<Acc>(geo, true, gout.workspace.data, kept);
    Op<Acc>::backward(geo, in, gin, gout, ws);
    reduce_qk_grad(geo, in.q, ws.dq_heads(), in.use_qk_l2norm, gout.dq);
    reduce_qk_grad(geo, in.k, ws.dk_heads(), in.use_qk_l2norm, gout.dk);
  }
  static constexpr ::flashdelta::detail::GatedDeltaRuleBackend table() {
    using Shape = GatedDeltaRuleShape;
    using Inputs = GatedDeltaRuleInputs;
    return {
        [](const Shape& s, const Inputs& in) { return bytes(s, in, false); },
        [](const Shape& s, const Inputs& in) { return bytes(s, in, true); },
        [](const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
           const GatedDeltaRuleForwardOutputs& out) {
          const GdnGeometry geo(s, in);
          f64(in) ? run_forward<double>(geo, in, out) : run_forward<float>(geo, in, out);
        },
        [](const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
           const GatedDeltaRuleBackwardInputs& gin, const GatedDeltaRuleBackwardOutputs& gout) {
          const GdnGeometry geo(s, in);
          f64(in) ? run_backward<double>(geo, in, gin, gout)
                  : run_backward<float>(geo, in, gin, gout);
        },
        kKeepsStates ? saved_bytes : nullptr,
        kKeepsStates ? +[](const Shape& s, const Inputs& in) { return bytes(s, in, true, true); }
                     : nullptr};
  }
};

}  // namespace flashdelta::cpu
