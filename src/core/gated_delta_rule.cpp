// Validation shared by chunk_gated_delta_rule and fused_recurrent_gated_delta_rule.
#include "gated_delta_rule_checks.h"

#include <cmath>

namespace flashdelta {

using detail::check_dtype_in;
using detail::check_rank;
using detail::check_same_device;
using detail::check_same_dtype;
using detail::check_shape;
using detail::check_value;

namespace {

template <typename Index>
void check_offsets(const Index* offsets, int64_t count, int64_t seq_len, const char* op) {
  check_value(offsets[0] == 0, op, ": cu_seqlens must start at 0, got ",
              static_cast<int64_t>(offsets[0]));
  for (int64_t i = 1; i < count; ++i) {
    check_value(offsets[i] >= offsets[i - 1], op,
                ": cu_seqlens must be non-decreasing, got cu_seqlens[", i - 1,
                "] = ", static_cast<int64_t>(offsets[i - 1]), " > cu_seqlens[", i,
                "] = ", static_cast<int64_t>(offsets[i]));
  }
  check_value(offsets[count - 1] == seq_len, op, ": cu_seqlens must end at T = ", seq_len,
              ", got ", static_cast<int64_t>(offsets[count - 1]));
}

}  // namespace

GatedDeltaRuleShape check_gated_delta_rule_inputs(const GatedDeltaRuleInputs& in) {
  const char* op = "gated_delta_rule";
  check_rank(in.q, 4, op, "q", "[B, T, H, K]");
  check_rank(in.k, 4, op, "k", "[B, T, H, K]");
  check_rank(in.v, 4, op, "v", "[B, T, HV, V]");
  check_rank(in.g, 3, op, "g", "[B, T, HV]");
  check_rank(in.beta, 3, op, "beta", "[B, T, HV]");

  const bool on_cpu = in.q.device.type == DeviceType::kCPU;
  if (on_cpu) {
    check_dtype_in(in.q, {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64},
                   op, "q");
  } else {
    check_dtype_in(in.q, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op, "q");
  }
  check_same_dtype(in.k, in.q, op, "k", "q");
  check_same_dtype(in.v, in.q, op, "v", "q");
  const bool f64 = in.q.dtype == DType::kFloat64;
  // g and beta may be kept in fp32 while q/k/v are bf16 (transformers computes g in fp32);
  // in float64 problems everything is float64.
  if (f64) {
    check_same_dtype(in.g, in.q, op, "g", "q");
    check_same_dtype(in.beta, in.q, op, "beta", "q");
  } else {
    check_dtype_in(in.g, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op, "g");
    check_dtype_in(in.beta, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op, "beta");
  }
  for (const auto& [t, name] : {std::pair{&in.k, "k"}, {&in.v, "v"}, {&in.g, "g"},
                                {&in.beta, "beta"}}) {
    check_same_device(*t, in.q, op, name, "q");
  }

  GatedDeltaRuleShape s;
  s.batch = in.q.shape[0];
  s.seq_len = in.q.shape[1];
  s.num_heads = in.q.shape[2];
  s.head_k_dim = in.q.shape[3];
  s.num_v_heads = in.v.shape[2];
  s.head_v_dim = in.v.shape[3];
  check_value(s.num_heads > 0 && s.head_k_dim > 0, op,
              ": q must have at least one head and K > 0, got shape ", shape_string(in.q));
  check_shape(in.k, {s.batch, s.seq_len, s.num_heads, s.head_k_dim}, op, "k",
              "[B, T, H, K] (as q)");
  check_value(in.v.shape[0] == s.batch && in.v.shape[1] == s.seq_len, op,
              ": v must have shape [B, T, HV, V] with B = ", s.batch, " and T = ", s.seq_len,
              " (from q), got ", shape_string(in.v));
  check_value(s.num_v_heads > 0 && s.head_v_dim > 0, op,
              ": v must have at least one head and V > 0, got shape ", shape_string(in.v));
  check_value(s.num_v_heads % s.num_heads == 0, op,
              ": the number of value heads HV (v.shape[2] = ", s.num_v_heads,
              ") must be a multiple of the number of query/key heads H (q.shape[2] = ",
              s.num_heads, ")");
  check_shape(in.g, {s.batch, s.seq_len, s.num_v_heads}, op, "g", "[B, T, HV]");
  check_shape(in.beta, {s.batch, s.seq_len, s.num_v_heads}, op, "beta", "[B, T, HV]");

  s.num_seqs = s.batch;
  if (in.cu_seqlens.defined()) {
    const TensorRef& cu = in.cu_seqlens;
    check_rank(cu, 1, op, "cu_seqlens", "[N + 1]");
    check_dtype_in(cu, {DType::kInt32, DType::kInt64}, op, "cu_seqlens");
    check_same_device(cu, in.q, op, "cu_seqlens", "q");
    check_value(cu.shape[0] >= 2, op,
                ": cu_seqlens must hold at least 2 offsets (one sequence), got shape ",
                shape_string(cu));
    check_value(s.batch == 1, op, ": cu_seqlens needs B = 1 (sequences packed along T), got B = ",
                s.batch);
    s.varlen = true;
    s.num_seqs = cu.shape[0] - 1;
    if (on_cpu) {
      check_value(cu.stride(0) == 1, op, ": cu_seqlens must be contiguous");
      if (cu.dtype == DType::kInt32) {
        check_offsets(static_cast<const int32_t*>(cu.data), cu.shape[0], s.seq_len, op);
      } else {
        check_offsets(static_cast<const int64_t*>(cu.data), cu.shape[0], s.seq_len, op);
      }
    }
  }
  if (in.initial_state.defined()) {
    const TensorRef& h0 = in.initial_state;
    check_dtype_in(h0, {f64 ? DType::kFloat64 : DType::kFloat32}, op, "initial_state");
    check_same_device(h0, in.q, op, "initial_state", "q");
    check_shape(h0, {s.num_seqs, s.num_v_heads, s.head_k_dim, s.head_v_dim}, op,
                "initial_state", "[N, HV, K, V]");
  }
  s.scale = in.scale > 0.0 ? in.scale : 1.0 / std::sqrt(static_cast<double>(s.head_k_dim));
  check_value(std::isfinite(s.scale), op, ": scale must be finite, got ", in.scale);
  return s;
}

namespace detail {

void check_forward_outputs(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                           const GatedDeltaRuleForwardOutputs& out, size_t workspace_bytes,
                           size_t saved_bytes, const char* op) {
  check_shape(out.o, {s.batch, s.seq_len, s.num_v_heads, s.head_v_dim}, op, "o",
              "[B, T, HV, V]");
  check_same_dtype(out.o, in.q, op, "o", "q");
  check_same_device(out.o, in.q, op, "o", "q");
  if (out.final_state.defined()) {
    check_shape(out.final_state, {s.num_seqs, s.num_v_heads, s.head_k_dim, s.head_v_dim}, op,
                "final_state", "[N, HV, K, V]");
    check_dtype_in(out.final_state,
                   {in.q.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32}, op,
                   "final_state");
    check_same_device(out.final_state, in.q, op, "final_state", "q");
  }
  check_workspace(out.workspace, workspace_bytes, in.q.device, op);
  if (out.saved.defined()) check_workspace(out.saved, saved_bytes, in.q.device, op, "saved");
}

void check_backward_args(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                         const GatedDeltaRuleBackwardInputs& gin,
                         const GatedDeltaRuleBackwardOutputs& gout, size_t workspace_bytes,
                         size_t saved_bytes, const char* op) {
  check_shape(gin.d_o, {s.batch, s.seq_len, s.num_v_heads, s.head_v_dim}, op, "d_o",
              "[B, T, HV, V]");
  check_same_device(gin.d_o, in.q, op, "d_o", "q");
  check_dtype_in(gin.d_o, {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64},
                 op, "d_o");
  const DType state_dtype = in.q.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  if (gin.d_final_state.defined()) {
    check_shape(gin.d_final_state, {s.num_seqs, s.num_v_heads, s.head_k_dim, s.head_v_dim}, op,
                "d_final_state", "[N, HV, K, V]");
    check_dtype_in(gin.d_final_state, {state_dtype}, op, "d_final_state");
    check_same_device(gin.d_final_state, in.q, op, "d_final_state", "q");
  }
  const std::pair<const TensorRef*, const TensorRef*> pairs[] = {
      {&gout.dq, &in.q}, {&gout.dk, &in.k}, {&gout.dv, &in.v}, {&gout.dg, &in.g},
      {&gout.dbeta, &in.beta}};
  const char* names[] = {"dq", "dk", "dv", "dg", "dbeta"};
  for (int i = 0; i < 5; ++i) {
    const TensorRef& grad = *pairs[i].first;
    const TensorRef& input = *pairs[i].second;
    check_present(grad, op, names[i]);
    check_value(grad.rank == input.rank, op, ": ", names[i], " must have the shape of its input ",
                shape_string(input), ", got ", shape_string(grad));
    for (int d = 0; d < input.rank; ++d) {
      check_value(grad.shape[d] == input.shape[d], op, ": ", names[i],
                  " must have the shape of its input ", shape_string(input), ", got ",
                  shape_string(grad));
    }
    check_same_dtype(grad, input, op, names[i], "its input");
    check_same_device(grad, in.q, op, names[i], "q");
  }
  check_value(gout.d_initial_state.defined() == in.initial_state.defined(), op,
              ": d_initial_state must be given exactly when initial_state is");
  if (gout.d_initial_state.defined()) {
    check_shape(gout.d_initial_state, {s.num_seqs, s.num_v_heads, s.head_k_dim, s.head_v_dim},
                op, "d_initial_state", "[N, HV, K, V]");
    check_dtype_in(gout.d_initial_state, {state_dtype}, op, "d_initial_state");
    check_same_device(gout.d_initial_state, in.q, op, "d_initial_state", "q");
  }
  check_workspace(gout.workspace, workspace_bytes, in.q.device, op);
  if (gin.saved.defined()) check_workspace(gin.saved, saved_bytes, in.q.device, op, "saved");
}

}  // namespace detail
}  // namespace flashdelta
