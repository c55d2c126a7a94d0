// flashdelta: the two RMSNorms of Qwen3.5 / Qwen3.5-MoE / Qwen3-Next, forward and backward.
// They share one argument struct and one implementation (gated = "gate is given").
//
// rms_norm (Qwen3_5RMSNorm, zero-centred; layer norms, final norm, per-head q_norm / k_norm):
//   r = rsqrt(mean(x^2) + eps)           (fp32)
//   y = cast_x(x * r * (1 + weight))     (fp32, one rounding at the end)
// rms_norm_gated (RMSNormGated of the Gated DeltaNet output), with transformers' casts:
//   n = cast_x(x * r);  p = weight * n   (rounded to x's dtype iff weight has x's dtype, else fp32)
//   y = cast_x(p * silu(gate))           (fp32)
// Rows are the leading dimensions flattened by the caller: x is [R, D] with unit stride along D
// and any row stride (a per-head view of a projection output needs no copy).
#pragma once

#include <cstddef>

#include "flashdelta/tensor.h"

namespace flashdelta {

struct RmsNormInputs {
  TensorRef x;       // [R, D] f32 | f16 | bf16; stride(1) == 1, any stride(0)
  TensorRef gate;    // rms_norm_gated only: [R, D], x's dtype, stride(1) == 1; absent otherwise
  TensorRef weight;  // [D] f32 | f16 | bf16, contiguous
  double eps = 1e-6;
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; ignored on CPU
};

struct RmsNormForwardOutputs {
  TensorRef y;     // [R, D] x's dtype, stride(1) == 1
  TensorRef rstd;  // [R] f32: r of each row, kept for the backward
};

struct RmsNormBackwardArgs {
  TensorRef rstd;       // [R] f32 from the forward
  TensorRef dy;         // [R, D] x's dtype, stride(1) == 1
  TensorRef dx;         // [R, D] x's dtype, stride(1) == 1 (written)
  TensorRef dgate;      // rms_norm_gated only: [R, D] x's dtype, stride(1) == 1 (written)
  TensorRef dweight;    // [D] weight's dtype, contiguous (written)
  TensorRef workspace;  // uint8, at least *_backward_workspace_bytes: per-block dweight partials
};

void rms_norm_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out);
size_t rms_norm_backward_workspace_bytes(const RmsNormInputs& in);
void rms_norm_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& args);

void rms_norm_gated_forward(const RmsNormInputs& in, const RmsNormForwardOutputs& out);
size_t rms_norm_gated_backward_workspace_bytes(const RmsNormInputs& in);
void rms_norm_gated_backward(const RmsNormInputs& in, const RmsNormBackwardArgs& args);

}  // namespace flashdelta
