// flashdelta: depthwise causal convolution over time, optionally followed by SiLU (the short
// convolution of Gated DeltaNet layers), forward and backward, and its one-step decode update.
//
// Per channel c of sequence b, with a kernel of W taps:
//   pre[b, c, t] = bias[c] + sum_{k < W} weight[c, k] * x[b, c, t - (W - 1) + k]
//   y[b, c, t]   = silu(pre) if silu, else pre
// where x before the start of t's sequence counts as 0 (the start is t = 0, or with cu_seqlens
// the offset of the packed sequence holding t: nothing leaks across sequence boundaries).
//
// Layout: transformers' [B, C, T]. Any strides are accepted; the fast path is the one Gated
// DeltaNet produces, a transposed view of a [B, T, C] tensor (channel stride 1).
#pragma once

#include <cstddef>

#include "flashdelta/tensor.h"

namespace flashdelta {

struct CausalConv1dInputs {
  TensorRef x;           // [B, C, T]  f32 | f16 | bf16 (| f64 on CPU), any strides
  TensorRef weight;      // [C, W]     f32 | f16 | bf16 (x's dtype on CPU for f64 x)
  TensorRef bias;        // optional [C], weight's dtype
  TensorRef cu_seqlens;  // optional [N + 1] int32 | int64 on x's device; then B == 1
  bool silu = false;     // apply SiLU after the convolution
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; ignored on CPU
};

struct CausalConv1dForwardOutputs {
  TensorRef y;  // [B, C, T] x's dtype, any strides
};

struct CausalConv1dBackwardInputs {
  TensorRef dy;  // [B, C, T] x's dtype, any strides
};

struct CausalConv1dBackwardOutputs {
  TensorRef dx;         // [B, C, T] x's dtype, any strides
  TensorRef dweight;    // [C, W] weight's dtype
  TensorRef dbias;      // [C] bias's dtype; required exactly when bias is given
  TensorRef workspace;  // uint8 [causal_conv1d_backward_workspace_bytes] (the weight-gradient
                        // partials, reduced in a fixed order: deterministic)
};

// The problem sizes, after validation.
struct CausalConv1dShape {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t seq_len = 0;   // T
  int64_t width = 0;     // W
  int64_t num_seqs = 0;  // N: B, or len(cu_seqlens) - 1
  bool varlen = false;
};

// Validates the inputs (ranks, sizes, dtypes, devices) and returns the sizes. Throws Error
// naming the argument, with what was expected and what was given.
CausalConv1dShape check_causal_conv1d_inputs(const CausalConv1dInputs& in);

size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dInputs& in);

void causal_conv1d_forward(const CausalConv1dInputs& in, const CausalConv1dForwardOutputs& out);

// Recomputes the convolution (nothing is saved by the forward but its inputs).
void causal_conv1d_backward(const CausalConv1dInputs& in, const CausalConv1dBackwardInputs& grad_in,
                            const CausalConv1dBackwardOutputs& grad_out);

// One decode step of L new tokens (usually 1) against a rolling window of the last S inputs,
// as transformers' torch causal_conv1d_update: with xs = concat(conv_state, x) along time
// (S + L columns),
//   y[b, c, l] = act(bias[c] + sum_{k < W} weight[c, k] * xs[b, c, S - W + 1 + l + k])
//   conv_state[b, c, :] <- xs[b, c, L:]   (in place; needs S >= W - 1)
struct CausalConv1dUpdateArgs {
  TensorRef x;           // [B, C, L]  f32 | f16 | bf16 (| f64 on CPU), any strides
  TensorRef conv_state;  // [B, C, S]  any float dtype, any strides: updated in place
  TensorRef weight;      // [C, W]
  TensorRef bias;        // optional [C], weight's dtype
  TensorRef y;           // [B, C, L]  x's dtype, any strides (must not overlap x or conv_state)
  bool silu = false;
  void* stream = nullptr;
};

void causal_conv1d_update(const CausalConv1dUpdateArgs& args);

}  // namespace flashdelta
