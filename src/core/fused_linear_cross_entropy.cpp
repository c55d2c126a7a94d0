// fused_linear_cross_entropy: argument validation, chunk-size choice and backend dispatch.
#include "flashdelta/fused_linear_cross_entropy.h"

#include <algorithm>
#include <cstdint>

#include "core/check.h"
#include "core/fused_linear_cross_entropy_backend.h"

#ifndef FLASHDELTA_WITH_CUDA
#define FLASHDELTA_WITH_CUDA 0
#endif

namespace flashdelta {
namespace detail {
namespace {

constexpr const char* kOp = "fused_linear_cross_entropy";
constexpr const char* kBackwardOp = "fused_linear_cross_entropy_backward";

// Upper bound on one chunk's logits. On CUDA the chunk is held in the inputs' dtype: 512 MiB is
// 1024 tokens of a 248,320-entry vocabulary in bf16, a GEMM large enough to run at full speed,
// and keeps the op's extra memory well under 1 GiB. The CPU backend holds fp32 logits and gains
// nothing from chunks beyond a few MiB.
constexpr int64_t kCudaChunkBytes = int64_t{512} << 20;
constexpr int64_t kCpuChunkBytes = int64_t{16} << 20;
// Rows per chunk are rounded down to a multiple of this (GEMM tile friendly) when above it.
constexpr int64_t kChunkRowQuantum = 128;

bool is_float(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

int64_t auto_chunk_rows(const TensorRef& hidden, int64_t n, int64_t v) {
  const bool on_cpu = hidden.device.type == DeviceType::kCPU;
  const int64_t logit_bytes = on_cpu ? 4 : static_cast<int64_t>(dtype_size(hidden.dtype));
  const int64_t budget = on_cpu ? kCpuChunkBytes : kCudaChunkBytes;
  int64_t rows = std::max<int64_t>(1, budget / std::max<int64_t>(1, v * logit_bytes));
  if (rows > kChunkRowQuantum) rows -= rows % kChunkRowQuantum;
  return std::min(rows, n);
}

FusedLinearCrossEntropyShape check_inputs(const FusedLinearCrossEntropyInputs& in) {
  check_rank(in.hidden, 2, kOp, "hidden", "[N, H]");
  check_rank(in.weight, 2, kOp, "weight", "[V, H]");
  check_rank(in.target, 1, kOp, "target", "[N]");
  check_dtype_in(in.hidden, {DType::kBFloat16, DType::kFloat16, DType::kFloat32}, kOp, "hidden");
  check_same_dtype(in.weight, in.hidden, kOp, "weight", "hidden");
  check_dtype_in(in.target, {DType::kInt64, DType::kInt32}, kOp, "target");
  check_same_device(in.weight, in.hidden, kOp, "weight", "hidden");
  check_same_device(in.target, in.hidden, kOp, "target", "hidden");

  FusedLinearCrossEntropyShape s;
  s.num_tokens = in.hidden.size(0);
  s.hidden_size = in.hidden.size(1);
  s.vocab_size = in.weight.size(0);
  check_value(in.weight.size(1) == s.hidden_size, kOp, ": weight must have shape [V, H] with H = ",
              s.hidden_size, " (hidden's last dimension), got ", shape_string(in.weight));
  check_value(s.vocab_size >= 1, kOp, ": weight must have at least one row (V >= 1), got ",
              shape_string(in.weight));
  check_value(s.hidden_size >= 1, kOp, ": hidden must have H >= 1, got ",
              shape_string(in.hidden));
  check_value(in.target.size(0) == s.num_tokens, kOp, ": target must have shape [N] = [",
              s.num_tokens, "] (hidden's first dimension), got ", shape_string(in.target));
  check_value(in.hidden.stride(1) == 1 || s.hidden_size == 1, kOp,
              ": hidden must have unit stride along H, got strides [", in.hidden.stride(0), ", ",
              in.hidden.stride(1), "]");
  check_value(in.hidden.stride(0) >= s.hidden_size || s.num_tokens <= 1, kOp,
              ": hidden's rows must not overlap (row stride ", in.hidden.stride(0), " < H = ",
              s.hidden_size, ")");
  check_value(in.weight.is_contiguous(), kOp, ": weight must be contiguous");
  check_value(in.chunk_rows >= 0, kOp, ": chunk_rows must be >= 0 (0: automatic), got ",
              in.chunk_rows);
  if (s.num_tokens > 0) {
    s.chunk_rows = in.chunk_rows > 0 ? std::min(in.chunk_rows, s.num_tokens)
                                     : auto_chunk_rows(in.hidden, s.num_tokens, s.vocab_size);
  }
  return s;
}

void check_contiguous_output(const TensorRef& t, std::initializer_list<int64_t> shape,
                             DType dtype, const Device& device, const char* op, const char* name,
                             const char* layout) {
  check_shape(t, shape, op, name, layout);
  if (t.dtype != dtype) {
    fail(Error::Kind::kType, op, ": ", name, " must have dtype ", dtype_name(dtype), ", got ",
         dtype_name(t.dtype));
  }
  if (t.device != device) {
    fail(Error::Kind::kValue, op, ": ", name, " is on ", device_name(t.device),
         " but the inputs are on ", device_name(device));
  }
  check_value(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

size_t backend_workspace_bytes(const FusedLinearCrossEntropyShape& s,
                               const FusedLinearCrossEntropyInputs& in) {
  if (in.hidden.device.type == DeviceType::kCPU) {
    return cpu::fused_linear_cross_entropy_workspace_bytes(s, in);
  }
#if FLASHDELTA_WITH_CUDA
  return cuda::fused_linear_cross_entropy_workspace_bytes(s, in);
#else
  detail::fail_without_cuda(kOp);
#endif
}

}  // namespace
}  // namespace detail

int64_t fused_linear_cross_entropy_chunk_rows(const FusedLinearCrossEntropyInputs& in) {
  return detail::check_inputs(in).chunk_rows;
}

size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyInputs& in) {
  const auto s = detail::check_inputs(in);
  return detail::backend_workspace_bytes(s, in);
}

void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out) {
  using namespace detail;
  const auto s = check_inputs(in);
  const Device dev = in.hidden.device;
  check_contiguous_output(out.loss_sum, {1}, DType::kFloat32, dev, kOp, "loss_sum", "[1]");
  check_contiguous_output(out.num_valid, {1}, DType::kFloat32, dev, kOp, "num_valid", "[1]");
  check_contiguous_output(out.d_hidden_sum, {s.num_tokens, s.hidden_size}, DType::kFloat32, dev,
                          kOp, "d_hidden_sum", "[N, H]");
  if (in.weight_grad) {
    check_contiguous_output(out.d_weight_sum, {s.vocab_size, s.hidden_size}, in.weight.dtype, dev,
                            kOp, "d_weight_sum", "[V, H]");
  } else {
    check_value(!out.d_weight_sum.defined(), kOp,
                ": d_weight_sum was given but weight_grad is false");
  }
  check_workspace(out.workspace, backend_workspace_bytes(s, in), dev, kOp);
  if (dev.type == DeviceType::kCPU) {
    cpu::fused_linear_cross_entropy_forward(s, in, out);
    return;
  }
#if FLASHDELTA_WITH_CUDA
  cuda::fused_linear_cross_entropy_forward(s, in, out);
#else
  detail::fail_without_cuda(kOp);
#endif
}

void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& a) {
  using namespace detail;
  const char* op = kBackwardOp;
  check_rank(a.d_hidden_sum, 2, op, "d_hidden_sum", "[N, H]");
  const Device dev = a.d_hidden_sum.device;
  const int64_t n = a.d_hidden_sum.size(0), h = a.d_hidden_sum.size(1);
  check_contiguous_output(a.grad_scale, {1}, DType::kFloat32, dev, op, "grad_scale", "[1]");
  check_contiguous_output(a.d_hidden_sum, {n, h}, DType::kFloat32, dev, op, "d_hidden_sum",
                          "[N, H]");
  check_present(a.d_hidden, op, "d_hidden");
  check_value(is_float(a.d_hidden.dtype), op, ": d_hidden must be a float tensor");
  check_contiguous_output(a.d_hidden, {n, h}, a.d_hidden.dtype, dev, op, "d_hidden", "[N, H]");
  if (a.d_weight_sum.defined()) {
    check_rank(a.d_weight_sum, 2, op, "d_weight_sum", "[V, H]");
    check_value(is_float(a.d_weight_sum.dtype), op, ": d_weight_sum must be a float tensor");
    const int64_t v = a.d_weight_sum.size(0);
    check_contiguous_output(a.d_weight_sum, {v, h}, a.d_weight_sum.dtype, dev, op,
                            "d_weight_sum", "[V, H]");
    check_contiguous_output(a.d_weight, {v, h}, a.d_weight_sum.dtype, dev, op, "d_weight",
                            "[V, H]");
    // d_weight is d_weight_sum itself (scaled in place) or a separate buffer: a partial overlap
    // would let the scale read elements it has already written.
    const auto* sum_begin = static_cast<const uint8_t*>(a.d_weight_sum.data);
    const auto* out_begin = static_cast<const uint8_t*>(a.d_weight.data);
    const size_t bytes = dtype_size(a.d_weight.dtype) * static_cast<size_t>(v * h);
    check_value(out_begin == sum_begin || out_begin + bytes <= sum_begin ||
                    sum_begin + bytes <= out_begin,
                op, ": d_weight must be d_weight_sum itself (in place) or not overlap it");
  } else {
    check_value(!a.d_weight.defined(), op, ": d_weight was given without d_weight_sum");
  }
  if (dev.type == DeviceType::kCPU) {
    cpu::fused_linear_cross_entropy_backward(a);
    return;
  }
#if FLASHDELTA_WITH_CUDA
  cuda::fused_linear_cross_entropy_backward(a);
#else
  detail::fail_without_cuda(op);
#endif
}

}  // namespace flashdelta
