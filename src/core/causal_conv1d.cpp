// causal_conv1d and causal_conv1d_update: validation, then the backend of the inputs' device.
#include "flashdelta/causal_conv1d.h"

#include "core/causal_conv1d_backend.h"
#include "core/check.h"

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

constexpr const char* kOp = "causal_conv1d";
constexpr const char* kUpdateOp = "causal_conv1d_update";

template <typename Index>
void check_offsets(const Index* offsets, int64_t stride, int64_t count, int64_t seq_len) {
  check_value(offsets[0] == 0, kOp, ": cu_seqlens must start at 0, got ",
              static_cast<int64_t>(offsets[0]));
  for (int64_t i = 1; i < count; ++i) {
    const int64_t prev = offsets[(i - 1) * stride], cur = offsets[i * stride];
    check_value(cur >= prev, kOp, ": cu_seqlens must be non-decreasing, got cu_seqlens[", i - 1,
                "] = ", prev, " > cu_seqlens[", i, "] = ", cur);
  }
  check_value(offsets[(count - 1) * stride] == seq_len, kOp, ": cu_seqlens must end at T = ",
              seq_len, ", got ", static_cast<int64_t>(offsets[(count - 1) * stride]));
}

// x's dtype decides the compute path; weight (and bias) may differ (an fp32 weight beside bf16
// activations, as under autocast), except in float64 problems (CPU only), where all are float64.
void check_weight_and_bias(const TensorRef& x, const TensorRef& weight, const TensorRef& bias,
                           int64_t channels, const char* op) {
  check_rank(weight, 2, op, "weight", "[C, W]");
  if (x.dtype == DType::kFloat64) {
    check_same_dtype(weight, x, op, "weight", "x");
  } else {
    check_dtype_in(weight, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op, "weight");
  }
  check_same_device(weight, x, op, "weight", "x");
  check_value(weight.shape[0] == channels, op, ": weight must have shape [C, W] with C = ",
              channels, " (x.shape[1]), got ", shape_string(weight));
  check_value(weight.shape[1] >= 1, op, ": weight must have at least one tap (W >= 1), got ",
              shape_string(weight));
  if (x.device.type == DeviceType::kCUDA) {
    check_value(weight.shape[1] >= detail::kCausalConv1dCudaMinWidth &&
                    weight.shape[1] <= detail::kCausalConv1dCudaMaxWidth,
                op, ": the CUDA kernels take a kernel width W in [",
                detail::kCausalConv1dCudaMinWidth, ", ", detail::kCausalConv1dCudaMaxWidth,
                "], got W = ", weight.shape[1]);
  }
  if (bias.defined()) {
    check_shape(bias, {channels}, op, "bias", "[C]");
    check_same_dtype(bias, weight, op, "bias", "weight");
    check_same_device(bias, x, op, "bias", "x");
  }
}

void check_activation_dtype(const TensorRef& x, const char* op) {
  if (x.device.type == DeviceType::kCPU) {
    check_dtype_in(x, {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}, op,
                   "x");
  } else {
    check_dtype_in(x, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op, "x");
  }
}

// A [B, C, T]-shaped tensor of x's dtype and device (outputs and gradients).
void check_like_x(const TensorRef& t, const CausalConv1dShape& s, const TensorRef& x,
                  const char* name) {
  check_shape(t, {s.batch, s.channels, s.seq_len}, kOp, name, "[B, C, T] (as x)");
  check_same_dtype(t, x, kOp, name, "x");
  check_same_device(t, x, kOp, name, "x");
}

[[noreturn]] void no_kernel(const Device& device, const char* op) {
  fail(Error::Kind::kNotImplemented, op, ": this build of flashdelta has no ",
       detail::device_name(device), " kernel for this op",
       device.type == DeviceType::kCUDA
           ? " (it was built without CUDA: set FLASHDELTA_WITH_CUDA=1 and a CUDA toolkit)"
           : "");
}

}  // namespace

CausalConv1dShape check_causal_conv1d_inputs(const CausalConv1dInputs& in) {
  check_rank(in.x, 3, kOp, "x", "[B, C, T]");
  check_activation_dtype(in.x, kOp);
  CausalConv1dShape s;
  s.batch = in.x.shape[0];
  s.channels = in.x.shape[1];
  s.seq_len = in.x.shape[2];
  check_weight_and_bias(in.x, in.weight, in.bias, s.channels, kOp);
  s.width = in.weight.shape[1];
  s.num_seqs = s.batch;
  if (in.cu_seqlens.defined()) {
    const TensorRef& cu = in.cu_seqlens;
    check_rank(cu, 1, kOp, "cu_seqlens", "[N + 1]");
    check_dtype_in(cu, {DType::kInt32, DType::kInt64}, kOp, "cu_seqlens");
    check_same_device(cu, in.x, kOp, "cu_seqlens", "x");
    check_value(cu.shape[0] >= 2, kOp,
                ": cu_seqlens must hold at least 2 offsets (one sequence), got shape ",
                shape_string(cu));
    check_value(s.batch == 1, kOp,
                ": cu_seqlens needs B = 1 (sequences packed along T), got B = ", s.batch);
    s.varlen = true;
    s.num_seqs = cu.shape[0] - 1;
    if (cu.device.type == DeviceType::kCPU) {  // on a GPU the values stay unread (no sync)
      if (cu.dtype == DType::kInt32) {
        check_offsets(static_cast<const int32_t*>(cu.data), cu.strides[0], cu.shape[0],
                      s.seq_len);
      } else {
        check_offsets(static_cast<const int64_t*>(cu.data), cu.strides[0], cu.shape[0],
                      s.seq_len);
      }
    }
  }
  return s;
}

size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dInputs& in) {
  const CausalConv1dShape s = check_causal_conv1d_inputs(in);
  if (in.x.device.type == DeviceType::kCPU) {
    return detail::cpu::causal_conv1d_backward_workspace_bytes(s);
  }
#if FLASHDELTA_WITH_CUDA
  return detail::cuda::causal_conv1d_backward_workspace_bytes(s);
#else
  no_kernel(in.x.device, kOp);
#endif
}

void causal_conv1d_forward(const CausalConv1dInputs& in, const CausalConv1dForwardOutputs& out) {
  const CausalConv1dShape s = check_causal_conv1d_inputs(in);
  check_like_x(out.y, s, in.x, "y");
  if (in.x.device.type == DeviceType::kCPU) return detail::cpu::causal_conv1d_forward(s, in, out);
#if FLASHDELTA_WITH_CUDA
  detail::cuda::causal_conv1d_forward(s, in, out);
#else
  no_kernel(in.x.device, kOp);
#endif
}

void causal_conv1d_backward(const CausalConv1dInputs& in, const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout) {
  const CausalConv1dShape s = check_causal_conv1d_inputs(in);
  check_like_x(gin.dy, s, in.x, "dy");
  check_like_x(gout.dx, s, in.x, "dx");
  check_shape(gout.dweight, {s.channels, s.width}, kOp, "dweight", "[C, W] (as weight)");
  check_same_dtype(gout.dweight, in.weight, kOp, "dweight", "weight");
  check_same_device(gout.dweight, in.x, kOp, "dweight", "x");
  check_value(gout.dbias.defined() == in.bias.defined(), kOp,
              ": dbias must be given exactly when bias is");
  if (gout.dbias.defined()) {
    check_shape(gout.dbias, {s.channels}, kOp, "dbias", "[C] (as bias)");
    check_same_dtype(gout.dbias, in.bias, kOp, "dbias", "bias");
    check_same_device(gout.dbias, in.x, kOp, "dbias", "x");
  }
  if (in.x.device.type == DeviceType::kCPU) {
    detail::check_workspace(gout.workspace, detail::cpu::causal_conv1d_backward_workspace_bytes(s),
                            in.x.device, kOp);
    return detail::cpu::causal_conv1d_backward(s, in, gin, gout);
  }
#if FLASHDELTA_WITH_CUDA
  detail::check_workspace(gout.workspace, detail::cuda::causal_conv1d_backward_workspace_bytes(s),
                          in.x.device, kOp);
  detail::cuda::causal_conv1d_backward(s, in, gin, gout);
#else
  no_kernel(in.x.device, kOp);
#endif
}

void causal_conv1d_update(const CausalConv1dUpdateArgs& a) {
  const char* op = kUpdateOp;
  check_rank(a.x, 3, op, "x", "[B, C, L]");
  check_activation_dtype(a.x, op);
  detail::CausalConv1dUpdateShape s;
  s.batch = a.x.shape[0];
  s.channels = a.x.shape[1];
  s.new_tokens = a.x.shape[2];
  check_weight_and_bias(a.x, a.weight, a.bias, s.channels, op);
  s.width = a.weight.shape[1];
  check_rank(a.conv_state, 3, op, "conv_state", "[B, C, S]");
  if (a.x.dtype == DType::kFloat64) {
    check_same_dtype(a.conv_state, a.x, op, "conv_state", "x");
  } else {
    check_dtype_in(a.conv_state, {DType::kFloat32, DType::kFloat16, DType::kBFloat16}, op,
                   "conv_state");
  }
  check_same_device(a.conv_state, a.x, op, "conv_state", "x");
  s.state_len = a.conv_state.shape[2];
  check_value(a.conv_state.shape[0] == s.batch && a.conv_state.shape[1] == s.channels, op,
              ": conv_state must have shape [B, C, S] with B = ", s.batch, " and C = ",
              s.channels, " (from x), got ", shape_string(a.conv_state));
  check_value(s.state_len >= s.width - 1, op, ": conv_state must hold at least W - 1 = ",
              s.width - 1, " past inputs (S >= W - 1), got S = ", s.state_len);
  check_shape(a.y, {s.batch, s.channels, s.new_tokens}, op, "y", "[B, C, L] (as x)");
  check_same_dtype(a.y, a.x, op, "y", "x");
  check_same_device(a.y, a.x, op, "y", "x");
  if (a.x.device.type == DeviceType::kCPU) return detail::cpu::causal_conv1d_update(s, a);
#if FLASHDELTA_WITH_CUDA
  detail::cuda::causal_conv1d_update(s, a);
#else
  no_kernel(a.x.device, op);
#endif
}

}  // namespace flashdelta
