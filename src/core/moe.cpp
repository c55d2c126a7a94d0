// Validation and backend choice for the mixture-of-experts ops: moe_router, moe_permute,
// moe_unpermute, moe_experts (include/flashdelta/moe_*.h).
#include <tuple>
#include <utility>

#include "check.h"
#include "moe_backend.h"

#ifndef FLASHDELTA_WITH_CUDA
#define FLASHDELTA_WITH_CUDA 0
#endif

namespace flashdelta {

using detail::check_dtype_in;
using detail::check_present;
using detail::check_rank;
using detail::check_same_device;
using detail::check_same_dtype;
using detail::check_shape;
using detail::check_value;
using detail::fail;

namespace {

constexpr std::initializer_list<DType> kFloatDtypes = {DType::kFloat32, DType::kFloat16,
                                                       DType::kBFloat16};

bool on_cuda(const TensorRef& t) { return t.device.type == DeviceType::kCUDA; }

// Calls the CUDA backend where it is built; the CPU one otherwise picks `cpu_call`.
#if FLASHDELTA_WITH_CUDA
#define FLASHDELTA_MOE_DISPATCH(op, tensor, fn, ...)             \
  do {                                                           \
    if (on_cuda(tensor)) {                                       \
      detail::cuda::fn(__VA_ARGS__);                             \
    } else {                                                     \
      detail::cpu::fn(__VA_ARGS__);                              \
    }                                                            \
  } while (0)
#else
#define FLASHDELTA_MOE_DISPATCH(op, tensor, fn, ...)             \
  do {                                                           \
    if (on_cuda(tensor)) detail::fail_without_cuda(op);          \
    detail::cpu::fn(__VA_ARGS__);                                \
  } while (0)
#endif

void check_contiguous(const TensorRef& t, const char* op, const char* name) {
  check_value(t.is_contiguous(), op, ": ", name, " must be contiguous, got shape ",
              shape_string(t));
}

void check_unit_inner_stride(const TensorRef& t, const char* op, const char* name) {
  check_value(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have unit stride along its last dimension, got shape ", shape_string(t));
  check_value(t.rank < 2 || t.size(-2) <= 1 || t.stride(-2) >= t.size(-1), op, ": ", name,
              " must not have overlapping rows");
}

// ------------------------------------------------------------------------------- moe_router

detail::MoeRouterShape check_router_inputs(const MoeRouterInputs& in) {
  const char* op = "moe_router";
  check_rank(in.logits, 2, op, "logits", "[T, E]");
  check_dtype_in(in.logits, kFloatDtypes, op, "logits");
  detail::MoeRouterShape s;
  s.num_tokens = in.logits.shape[0];
  s.num_experts = in.logits.shape[1];
  s.top_k = in.top_k;
  check_value(s.num_experts >= 1, op, ": logits must have at least one expert, got shape ",
              shape_string(in.logits));
  check_value(in.top_k >= 1 && in.top_k <= s.num_experts, op,
              ": top_k must be in [1, E = ", s.num_experts, "], got ", in.top_k);
  // The CUDA kernel keeps one row per warp in registers.
  check_value(!on_cuda(in.logits) || s.num_experts <= 1024, op,
              ": the cuda kernel supports up to 1024 experts, got ", s.num_experts);
  return s;
}

}  // namespace

void moe_router_forward(const MoeRouterInputs& in, const MoeRouterForwardOutputs& out) {
  const char* op = "moe_router";
  const detail::MoeRouterShape s = check_router_inputs(in);
  check_shape(out.weights, {s.num_tokens, s.top_k}, op, "weights", "[T, top_k]");
  check_same_dtype(out.weights, in.logits, op, "weights", "logits");
  check_contiguous(out.weights, op, "weights");
  check_shape(out.indices, {s.num_tokens, s.top_k}, op, "indices", "[T, top_k]");
  check_dtype_in(out.indices, {DType::kInt64}, op, "indices");
  check_contiguous(out.indices, op, "indices");
  check_same_device(out.weights, in.logits, op, "weights", "logits");
  check_same_device(out.indices, in.logits, op, "indices", "logits");
  if (s.num_tokens == 0) return;
  FLASHDELTA_MOE_DISPATCH(op, in.logits, moe_router_forward, s, in, out);
}

void moe_router_backward(const MoeRouterInputs& in, const MoeRouterBackwardArgs& args) {
  const char* op = "moe_router_backward";
  const detail::MoeRouterShape s = check_router_inputs(in);
  check_shape(args.indices, {s.num_tokens, s.top_k}, op, "indices", "[T, top_k]");
  check_dtype_in(args.indices, {DType::kInt64}, op, "indices");
  check_contiguous(args.indices, op, "indices");
  check_shape(args.d_weights, {s.num_tokens, s.top_k}, op, "d_weights", "[T, top_k]");
  check_dtype_in(args.d_weights, kFloatDtypes, op, "d_weights");
  check_shape(args.d_logits, {s.num_tokens, s.num_experts}, op, "d_logits", "[T, E]");
  check_same_dtype(args.d_logits, in.logits, op, "d_logits", "logits");
  check_contiguous(args.d_logits, op, "d_logits");
  for (const auto& [t, name] : {std::pair{&args.indices, "indices"}, {&args.d_weights, "d_weights"},
                                {&args.d_logits, "d_logits"}}) {
    check_same_device(*t, in.logits, op, name, "logits");
  }
  if (s.num_tokens == 0) return;
  FLASHDELTA_MOE_DISPATCH(op, in.logits, moe_router_backward, s, in, args);
}

// ------------------------------------------------------------------------------- moe_permute

namespace {

detail::MoePermuteShape check_permute_args(const MoePermuteArgs& a) {
  const char* op = "moe_permute";
  check_rank(a.hidden, 2, op, "hidden", "[T, H]");
  check_dtype_in(a.hidden, kFloatDtypes, op, "hidden");
  check_unit_inner_stride(a.hidden, op, "hidden");
  check_rank(a.indices, 2, op, "indices", "[T, top_k]");
  check_dtype_in(a.indices, {DType::kInt32, DType::kInt64}, op, "indices");
  check_same_device(a.indices, a.hidden, op, "indices", "hidden");
  detail::MoePermuteShape s;
  s.num_tokens = a.hidden.shape[0];
  s.hidden = a.hidden.shape[1];
  s.top_k = a.indices.shape[1];
  s.num_pairs = s.num_tokens * s.top_k;
  s.num_experts = a.num_experts;
  check_value(a.indices.shape[0] == s.num_tokens, op, ": indices must have shape [T, top_k] with T = ",
              s.num_tokens, " (from hidden), got ", shape_string(a.indices));
  check_value(s.top_k >= 1, op, ": indices must have top_k >= 1 columns, got shape ",
              shape_string(a.indices));
  check_value(a.num_experts >= 1 && a.num_experts <= (int64_t{1} << 20), op,
              ": num_experts must be in [1, 2^20], got ", a.num_experts);
  check_value(s.num_pairs < (int64_t{1} << 31), op, ": T * top_k must be below 2^31, got ",
              s.num_pairs);
  // The CUDA sort keeps one histogram of E + 1 buckets per block in shared memory.
  check_value(!on_cuda(a.hidden) || a.num_experts <= 8192, op,
              ": the cuda kernels support up to 8192 experts, got ", a.num_experts);
  return s;
}

void check_pair_position(const TensorRef& t, int64_t num_pairs, const TensorRef& ref,
                         const char* op) {
  check_shape(t, {num_pairs}, op, "pair_position", "[T * top_k]");
  check_dtype_in(t, {DType::kInt32}, op, "pair_position");
  check_contiguous(t, op, "pair_position");
  check_same_device(t, ref, op, "pair_position", "rows");
}

}  // namespace

size_t moe_permute_workspace_bytes(const MoePermuteArgs& args) {
  const detail::MoePermuteShape s = check_permute_args(args);
#if FLASHDELTA_WITH_CUDA
  if (on_cuda(args.hidden)) return detail::cuda::moe_permute_workspace_bytes(s);
#endif
  if (on_cuda(args.hidden)) detail::fail_without_cuda("moe_permute");
  return detail::cpu::moe_permute_workspace_bytes(s);
}

void moe_permute(const MoePermuteArgs& a) {
  const char* op = "moe_permute";
  const detail::MoePermuteShape s = check_permute_args(a);
  check_shape(a.permuted, {s.num_pairs, s.hidden}, op, "permuted", "[T * top_k, H]");
  check_same_dtype(a.permuted, a.hidden, op, "permuted", "hidden");
  check_contiguous(a.permuted, op, "permuted");
  for (const auto& [t, name, n] : {std::tuple{&a.sorted_pairs, "sorted_pairs", s.num_pairs},
                                   {&a.pair_position, "pair_position", s.num_pairs},
                                   {&a.expert_offsets, "expert_offsets", s.num_experts + 1}}) {
    check_shape(*t, {n}, op, name, name[0] == 'e' ? "[E + 1]" : "[T * top_k]");
    check_dtype_in(*t, {DType::kInt32}, op, name);
    check_contiguous(*t, op, name);
    check_same_device(*t, a.hidden, op, name, "hidden");
  }
  check_same_device(a.permuted, a.hidden, op, "permuted", "hidden");
  size_t ws = 0;
#if FLASHDELTA_WITH_CUDA
  ws = on_cuda(a.hidden) ? detail::cuda::moe_permute_workspace_bytes(s)
                         : detail::cpu::moe_permute_workspace_bytes(s);
#else
  ws = detail::cpu::moe_permute_workspace_bytes(s);
#endif
  detail::check_workspace(a.workspace, ws, a.hidden.device, op);
  FLASHDELTA_MOE_DISPATCH(op, a.hidden, moe_permute, s, a);
}

namespace {

detail::MoePermuteShape check_unpermute_args(const MoeUnpermuteArgs& a, const char* op) {
  check_rank(a.rows, 2, op, "rows", "[T * top_k, H]");
  check_dtype_in(a.rows, kFloatDtypes, op, "rows");
  check_contiguous(a.rows, op, "rows");
  check_rank(a.out, 2, op, "out", "[T, H]");
  detail::MoePermuteShape s;
  s.num_tokens = a.out.shape[0];
  s.hidden = a.rows.shape[1];
  s.num_pairs = a.rows.shape[0];
  check_value(s.num_tokens >= 1 ? s.num_pairs % s.num_tokens == 0 : s.num_pairs == 0, op,
              ": rows must have T * top_k rows with T = ", s.num_tokens,
              " (from out), got shape ", shape_string(a.rows));
  s.top_k = s.num_tokens >= 1 ? s.num_pairs / s.num_tokens : 1;
  check_shape(a.out, {s.num_tokens, s.hidden}, op, "out", "[T, H]");
  check_same_dtype(a.out, a.rows, op, "out", "rows");
  check_contiguous(a.out, op, "out");
  check_same_device(a.out, a.rows, op, "out", "rows");
  if (a.weights.defined()) {
    check_shape(a.weights, {s.num_tokens, s.top_k}, op, "weights", "[T, top_k]");
    check_dtype_in(a.weights, kFloatDtypes, op, "weights");
    check_same_device(a.weights, a.rows, op, "weights", "rows");
  }
  check_pair_position(a.pair_position, s.num_pairs, a.rows, op);
  return s;
}

}  // namespace

void moe_unpermute_forward(const MoeUnpermuteArgs& a) {
  const char* op = "moe_unpermute";
  const detail::MoePermuteShape s = check_unpermute_args(a, op);
  if (s.num_tokens == 0) return;
  FLASHDELTA_MOE_DISPATCH(op, a.rows, moe_unpermute_forward, s, a);
}

void moe_unpermute_backward(const MoeUnpermuteArgs& a, const MoeUnpermuteBackwardArgs& g) {
  const char* op = "moe_unpermute_backward";
  const detail::MoePermuteShape s = check_unpermute_args(a, op);
  check_shape(g.d_out, {s.num_tokens, s.hidden}, op, "d_out", "[T, H]");
  check_same_dtype(g.d_out, a.rows, op, "d_out", "rows");
  check_unit_inner_stride(g.d_out, op, "d_out");
  check_same_device(g.d_out, a.rows, op, "d_out", "rows");
  check_shape(g.d_rows, {s.num_pairs, s.hidden}, op, "d_rows", "[T * top_k, H]");
  check_same_dtype(g.d_rows, a.rows, op, "d_rows", "rows");
  check_contiguous(g.d_rows, op, "d_rows");
  check_same_device(g.d_rows, a.rows, op, "d_rows", "rows");
  check_value(g.d_weights.defined() == a.weights.defined(), op,
              ": d_weights must be given exactly when weights are");
  if (g.d_weights.defined()) {
    check_shape(g.d_weights, {s.num_tokens, s.top_k}, op, "d_weights", "[T, top_k]");
    check_same_dtype(g.d_weights, a.weights, op, "d_weights", "weights");
    check_contiguous(g.d_weights, op, "d_weights");
    check_same_device(g.d_weights, a.rows, op, "d_weights", "rows");
  }
  if (s.num_tokens == 0) return;
  FLASHDELTA_MOE_DISPATCH(op, a.rows, moe_unpermute_backward, s, a, g);
}

// ------------------------------------------------------------------------------- moe_experts

namespace {

detail::MoeExpertsShape check_experts_inputs(const MoeExpertsInputs& in, const char* op) {
  check_rank(in.hidden, 2, op, "hidden", "[N, H]");
  if (on_cuda(in.hidden)) {
    check_dtype_in(in.hidden, {DType::kFloat16, DType::kBFloat16}, op, "hidden");
  } else {
    check_dtype_in(in.hidden, kFloatDtypes, op, "hidden");
  }
  check_unit_inner_stride(in.hidden, op, "hidden");
  check_rank(in.gate_up_proj, 3, op, "gate_up_proj", "[E, 2I, H]");
  check_rank(in.down_proj, 3, op, "down_proj", "[E, H, I]");
  detail::MoeExpertsShape s;
  s.num_rows = in.hidden.shape[0];
  s.hidden = in.hidden.shape[1];
  s.num_experts = in.gate_up_proj.shape[0];
  check_value(in.gate_up_proj.shape[1] % 2 == 0 && in.gate_up_proj.shape[1] > 0, op,
              ": gate_up_proj must have an even, non-zero number of rows 2I, got shape ",
              shape_string(in.gate_up_proj));
  s.intermediate = in.gate_up_proj.shape[1] / 2;
  check_value(s.num_experts >= 1, op, ": gate_up_proj must hold at least one expert");
  check_value(!on_cuda(in.hidden) || s.num_experts <= 65535, op,
              ": the cuda kernels support up to 65535 experts, got ", s.num_experts);
  check_shape(in.gate_up_proj, {s.num_experts, 2 * s.intermediate, s.hidden}, op, "gate_up_proj",
              "[E, 2I, H] (H from hidden)");
  check_shape(in.down_proj, {s.num_experts, s.hidden, s.intermediate}, op, "down_proj",
              "[E, H, I]");
  check_same_dtype(in.gate_up_proj, in.hidden, op, "gate_up_proj", "hidden");
  check_same_dtype(in.down_proj, in.hidden, op, "down_proj", "hidden");
  check_unit_inner_stride(in.gate_up_proj, op, "gate_up_proj");
  check_unit_inner_stride(in.down_proj, op, "down_proj");
  check_value(in.gate_up_proj.stride(0) >= 2 * s.intermediate * s.hidden &&
                  in.down_proj.stride(0) >= s.hidden * s.intermediate,
              op, ": the expert weights must not overlap across experts");
  check_shape(in.expert_offsets, {s.num_experts + 1}, op, "expert_offsets", "[E + 1]");
  check_dtype_in(in.expert_offsets, {DType::kInt32}, op, "expert_offsets");
  check_contiguous(in.expert_offsets, op, "expert_offsets");
  for (const auto& [t, name] : {std::pair{&in.gate_up_proj, "gate_up_proj"},
                                {&in.down_proj, "down_proj"},
                                {&in.expert_offsets, "expert_offsets"}}) {
    check_same_device(*t, in.hidden, op, name, "hidden");
  }
  check_value(s.num_rows < (int64_t{1} << 31), op, ": hidden must have fewer than 2^31 rows");
  if (!on_cuda(in.hidden)) {  // on a GPU reading them would synchronise: the kernels clamp
    const int32_t* off = static_cast<const int32_t*>(in.expert_offsets.data);
    check_value(off[0] == 0, op, ": expert_offsets must start at 0, got ", off[0]);
    for (int64_t e = 0; e < s.num_experts; ++e) {
      check_value(off[e + 1] >= off[e], op, ": expert_offsets must be non-decreasing, got [",
                  e, "] = ", off[e], " > [", e + 1, "] = ", off[e + 1]);
    }
    check_value(off[s.num_experts] <= s.num_rows, op, ": expert_offsets[E] = ",
                off[s.num_experts], " exceeds the number of rows N = ", s.num_rows);
  }
  return s;
}

void check_matrix_output(const TensorRef& t, std::initializer_list<int64_t> shape,
                         const TensorRef& ref, const char* op, const char* name,
                         const char* layout) {
  check_shape(t, shape, op, name, layout);
  check_same_dtype(t, ref, op, name, "hidden");
  check_contiguous(t, op, name);
  check_same_device(t, ref, op, name, "hidden");
}

}  // namespace

void moe_experts_forward(const MoeExpertsInputs& in, const MoeExpertsForwardOutputs& out) {
  const char* op = "moe_experts";
  const detail::MoeExpertsShape s = check_experts_inputs(in, op);
  const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate;
  check_matrix_output(out.out, {N, H}, in.hidden, op, "out", "[N, H]");
  check_matrix_output(out.gate_up, {N, 2 * I}, in.hidden, op, "gate_up", "[N, 2I]");
  check_matrix_output(out.act, {N, I}, in.hidden, op, "act", "[N, I]");
  if (N == 0) return;
  FLASHDELTA_MOE_DISPATCH(op, in.hidden, moe_experts_forward, s, in, out);
}

void moe_experts_backward(const MoeExpertsInputs& in, const MoeExpertsBackwardArgs& a) {
  const char* op = "moe_experts_backward";
  const detail::MoeExpertsShape s = check_experts_inputs(in, op);
  const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate, E = s.num_experts;
  check_shape(a.d_out, {N, H}, op, "d_out", "[N, H]");
  check_same_dtype(a.d_out, in.hidden, op, "d_out", "hidden");
  check_unit_inner_stride(a.d_out, op, "d_out");
  check_same_device(a.d_out, in.hidden, op, "d_out", "hidden");
  check_matrix_output(a.gate_up, {N, 2 * I}, in.hidden, op, "gate_up", "[N, 2I]");
  check_matrix_output(a.d_hidden, {N, H}, in.hidden, op, "d_hidden", "[N, H]");
  check_matrix_output(a.d_gate_up, {N, 2 * I}, in.hidden, op, "d_gate_up", "[N, 2I]");
  check_matrix_output(a.act, {N, I}, in.hidden, op, "act", "[N, I]");
  if (a.d_gate_up_proj.defined()) {
    check_matrix_output(a.d_gate_up_proj, {E, 2 * I, H}, in.hidden, op, "d_gate_up_proj",
                        "[E, 2I, H]");
  }
  if (a.d_down_proj.defined()) {
    check_matrix_output(a.d_down_proj, {E, H, I}, in.hidden, op, "d_down_proj", "[E, H, I]");
  }
  FLASHDELTA_MOE_DISPATCH(op, in.hidden, moe_experts_backward, s, in, a);
}

}  // namespace flashdelta
