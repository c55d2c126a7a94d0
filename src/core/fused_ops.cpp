// Validation and backend choice for the fused layer ops: rms_norm, rms_norm_gated, swiglu,
// attention_gate, partial_rotary_embedding. Every check names the op and the argument.
#include "check.h"
#include "fused_ops_backend.h"

#ifndef FLASHDELTA_WITH_CUDA
#define FLASHDELTA_WITH_CUDA 0
#endif

namespace flashdelta {
namespace detail {
namespace {

constexpr std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16,
                                                      DType::kBFloat16};

bool on_cuda(const TensorRef& t) { return t.device.type == DeviceType::kCUDA; }

// t: [rows, dim] with unit stride along dim, on ref's device, a float dtype.
void check_rows(const TensorRef& t, const RowsShape& s, const TensorRef& ref, const char* op,
                const char* name, const char* ref_name) {
  check_shape(t, {s.rows, s.dim}, op, name, "[R, D]");
  check_dtype_in(t, kFloatTypes, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_value(t.stride(1) == 1 || s.dim == 1, op, ": ", name,
              " must have unit stride along its last dimension, got stride ", t.stride(1));
}

RowsShape rows_of(const TensorRef& x, const char* op, const char* name) {
  check_rank(x, 2, op, name, "[R, D]");
  RowsShape s{x.size(0), x.size(1)};
  check_value(s.dim > 0, op, ": ", name, " must have D > 0, got shape ", shape_string(x));
  check_rows(x, s, x, op, name, name);
  return s;
}

// ----------------------------------------------------------------------------- rms_norm

RowsShape check_rms_norm_inputs(const RmsNormInputs& in, bool gated, const char* op) {
  const RowsShape s = rows_of(in.x, op, "x");
  if (gated) {
    check_rows(in.gate, s, in.x, op, "gate", "x");
    check_same_dtype(in.gate, in.x, op, "gate", "x");
  } else {
    check_value(!in.gate.defined(), op, ": gate must not be given (use rms_norm_gated)");
  }
  check_shape(in.weight, {s.dim}, op, "weight", "[D]");
  check_dtype_in(in.weight, kFloatTypes, op, "weight");
  check_same_device(in.weight, in.x, op, "weight", "x");
  check_value(in.weight.stride(0) == 1 || s.dim == 1, op, ": weight must be contiguous");
  check_value(in.eps >= 0.0, op, ": eps must be >= 0, got ", in.eps);
  return s;
}

size_t rms_norm_workspace(const RmsNormInputs& in, bool gated, const char* op) {
  const RowsShape s = check_rms_norm_inputs(in, gated, op);
  if (on_cuda(in.x)) {
#if FLASHDELTA_WITH_CUDA
    return cuda::rms_norm_backward_workspace_bytes(s);
#else
    detail::fail_without_cuda(op);
#endif
  }
  return cpu::rms_norm_backward_workspace_bytes(s);
}

void rms_norm_fwd(const RmsNormInputs& in, const RmsNormForwardOutputs& out, bool gated,
                  const char* op) {
  const RowsShape s = check_rms_norm_inputs(in, gated, op);
  check_rows(out.y, s, in.x, op, "y", "x");
  check_same_dtype(out.y, in.x, op, "y", "x");
  check_shape(out.rstd, {s.rows}, op, "rstd", "[R]");
  check_dtype_in(out.rstd, {DType::kFloat32}, op, "rstd");
  check_same_device(out.rstd, in.x, op, "rstd", "x");
  check_value(out.rstd.stride(0) == 1 || s.rows == 1, op, ": rstd must be contiguous");
  if (on_cuda(in.x)) {
#if FLASHDELTA_WITH_CUDA
    return cuda::rms_norm_forward(in, out, s);
#else
    detail::fail_without_cuda(op);
#endif
  }
  cpu::rms_norm_forward(in, out, s);
}

void rms_norm_bwd(const RmsNormInputs& in, const RmsNormBackwardArgs& a, bool gated,
                  const char* op) {
  const RowsShape s = check_rms_norm_inputs(in, gated, op);
  check_shape(a.rstd, {s.rows}, op, "rstd", "[R]");
  check_dtype_in(a.rstd, {DType::kFloat32}, op, "rstd");
  check_same_device(a.rstd, in.x, op, "rstd", "x");
  check_value(a.rstd.stride(0) == 1 || s.rows == 1, op, ": rstd must be contiguous");
  for (const auto& [t, name] : {std::pair{&a.dy, "dy"}, {&a.dx, "dx"}}) {
    check_rows(*t, s, in.x, op, name, "x");
    check_same_dtype(*t, in.x, op, name, "x");
  }
  if (gated) {
    check_rows(a.dgate, s, in.x, op, "dgate", "x");
    check_same_dtype(a.dgate, in.x, op, "dgate", "x");
  }
  check_shape(a.dweight, {s.dim}, op, "dweight", "[D]");
  check_same_dtype(a.dweight, in.weight, op, "dweight", "weight");
  check_same_device(a.dweight, in.x, op, "dweight", "x");
  check_value(a.dweight.stride(0) == 1 || s.dim == 1, op, ": dweight must be contiguous");
  if (on_cuda(in.x)) {
#if FLASHDELTA_WITH_CUDA
    check_workspace(a.workspace, cuda::rms_norm_backward_workspace_bytes(s), in.x.device, op);
    return cuda::rms_norm_backward(in, a, s);
#else
    detail::fail_without_cuda(op);
#endif
  }
  check_workspace(a.workspace, cpu::rms_norm_backward_workspace_bytes(s), in.x.device, op);
  cpu::rms_norm_backward(in, a, s);
}

// ----------------------------------------------------------------------------- gated products

struct GatedProductNames {
  const char* op;
  const char* value;  // "up" or "attn"
};

RowsShape check_gated_product_inputs(const GatedProductArgs& in, const GatedProductNames& n) {
  const RowsShape s = rows_of(in.value, n.op, n.value);
  check_rows(in.gate, s, in.value, n.op, "gate", n.value);
  check_same_dtype(in.gate, in.value, n.op, "gate", n.value);
  return s;
}

void gated_product_fwd(GateActivation act, const GatedProductArgs& in, const TensorRef& out,
                       const GatedProductNames& n) {
  const RowsShape s = check_gated_product_inputs(in, n);
  check_rows(out, s, in.value, n.op, "out", n.value);
  check_same_dtype(out, in.value, n.op, "out", n.value);
  if (on_cuda(in.value)) {
#if FLASHDELTA_WITH_CUDA
    return cuda::gated_product_forward(act, in, out, s);
#else
    detail::fail_without_cuda(n.op);
#endif
  }
  cpu::gated_product_forward(act, in, out, s);
}

void gated_product_bwd(GateActivation act, const GatedProductArgs& in,
                       const GatedProductGradients& g, const GatedProductNames& n) {
  const RowsShape s = check_gated_product_inputs(in, n);
  for (const auto& [t, name] :
       {std::pair{&g.d_out, "d_out"}, {&g.d_value, "d_value"}, {&g.d_gate, "d_gate"}}) {
    check_rows(*t, s, in.value, n.op, name, n.value);
    check_same_dtype(*t, in.value, n.op, name, n.value);
  }
  if (on_cuda(in.value)) {
#if FLASHDELTA_WITH_CUDA
    return cuda::gated_product_backward(act, in, g, s);
#else
    detail::fail_without_cuda(n.op);
#endif
  }
  cpu::gated_product_backward(act, in, g, s);
}

constexpr GatedProductNames kSwiglu{"swiglu", "up"};
constexpr GatedProductNames kAttentionGate{"attention_gate", "attn"};

// ----------------------------------------------------------------------------- rotary

void rotary(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out, const TensorRef& k_out,
            bool backward) {
  const char* op = backward ? "partial_rotary_embedding_backward" : "partial_rotary_embedding";
  const char* qn = backward ? "dq_out" : "q";
  const char* kn = backward ? "dk_out" : "k";
  const char* qon = backward ? "dq" : "q_out";
  const char* kon = backward ? "dk" : "k_out";
  check_rank(in.q, 4, op, qn, "[B, T, H, head_dim]");
  check_dtype_in(in.q, kFloatTypes, op, qn);
  RotaryShape s;
  s.batch = in.q.size(0);
  s.seq_len = in.q.size(1);
  s.num_q_heads = in.q.size(2);
  s.head_dim = in.q.size(3);
  check_rank(in.k, 4, op, kn, "[B, T, HK, head_dim]");
  s.num_k_heads = in.k.size(2);
  check_shape(in.k, {s.batch, s.seq_len, s.num_k_heads, s.head_dim}, op, kn,
              "[B, T, HK, head_dim] (B, T, head_dim of q)");
  check_rank(in.cos, 3, op, "cos", "[B, T, rotary_dim]");
  s.rotary_dim = in.cos.size(2);
  check_shape(in.cos, {s.batch, s.seq_len, s.rotary_dim}, op, "cos",
              "[B, T, rotary_dim] (B, T of q)");
  check_shape(in.sin, {s.batch, s.seq_len, s.rotary_dim}, op, "sin", "[B, T, rotary_dim] (as cos)");
  check_value(s.rotary_dim % 2 == 0 && s.rotary_dim <= s.head_dim, op,
              ": rotary_dim (cos.shape[-1] = ", s.rotary_dim,
              ") must be even and at most head_dim = ", s.head_dim);
  const auto rows4 = {s.batch, s.seq_len, s.num_q_heads, s.head_dim};
  const auto rowsk = {s.batch, s.seq_len, s.num_k_heads, s.head_dim};
  check_shape(q_out, rows4, op, qon, "[B, T, H, head_dim] (as q)");
  check_shape(k_out, rowsk, op, kon, "[B, T, HK, head_dim] (as k)");
  const std::pair<const TensorRef*, const char*> all[] = {
      {&in.k, kn}, {&in.cos, "cos"}, {&in.sin, "sin"}, {&q_out, qon}, {&k_out, kon}};
  for (const auto& [t, name] : all) {
    check_same_dtype(*t, in.q, op, name, qn);
    check_same_device(*t, in.q, op, name, qn);
  }
  const std::pair<const TensorRef*, const char*> inner[] = {
      {&in.q, qn}, {&in.k, kn}, {&in.cos, "cos"}, {&in.sin, "sin"}, {&q_out, qon}, {&k_out, kon}};
  for (const auto& [t, name] : inner) {
    check_value(t->stride(-1) == 1 || t->size(-1) <= 1, op, ": ", name,
                " must have unit stride along its last dimension, got stride ", t->stride(-1));
  }
  if (on_cuda(in.q)) {
#if FLASHDELTA_WITH_CUDA
    return cuda::partial_rotary_embedding(in, q_out, k_out, s, backward);
#else
    detail::fail_without_cuda(op);
#endif
  }
  cpu::partial_rotary_embedding(in, q_out, k_out, s, backward);
}

}  // namespace
}  // namespace detail

using detail::GateActivation;

void rms_norm_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out) {
  detail::rms_norm_fwd(in, out, false, "rms_norm");
}
size_t rms_norm_backward_workspace_bytes(const RmsNormInputs& in) {
  return detail::rms_norm_workspace(in, false, "rms_norm");
}
void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& args) {
  detail::rms_norm_bwd(in, args, false, "rms_norm_backward");
}
void rms_norm_gated_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out) {
  detail::rms_norm_fwd(in, out, true, "rms_norm_gated");
}
size_t rms_norm_gated_backward_workspace_bytes(const RmsNormInputs& in) {
  return detail::rms_norm_workspace(in, true, "rms_norm_gated");
}
void rms_norm_gated_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& args) {
  detail::rms_norm_bwd(in, args, true, "rms_norm_gated_backward");
}

void swiglu_forward(const GatedProductArgs& in, const TensorRef& out) {
  detail::gated_product_fwd(GateActivation::kSilu, in, out, detail::kSwiglu);
}
void swiglu_backward(const GatedProductArgs& in, const GatedProductGradients& grads) {
  detail::gated_product_bwd(GateActivation::kSilu, in, grads, detail::kSwiglu);
}
void attention_gate_forward(const GatedProductArgs& in, const TensorRef& out) {
  detail::gated_product_fwd(GateActivation::kSigmoid, in, out, detail::kAttentionGate);
}
void attention_gate_backward(const GatedProductArgs& in, const GatedProductGradients& grads) {
  detail::gated_product_bwd(GateActivation::kSigmoid, in, grads, detail::kAttentionGate);
}

void partial_rotary_embedding_forward(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out,
                                      const TensorRef& k_out) {
  detail::rotary(in, q_out, k_out, false);
}
void partial_rotary_embedding_backward(const PartialRotaryEmbeddingArgs& grads_out,
                                       const TensorRef& dq, const TensorRef& dk) {
  detail::rotary(grads_out, dq, dk, true);
}

}  // namespace flashdelta
