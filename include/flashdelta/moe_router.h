// flashdelta: the mixture-of-experts router after its projection.
//
// For every token t, from router logits l[t, :] over E experts:
//   p = softmax(l) in fp32,  (s, idx) = top_k(p) (largest first; exact ties: lower expert first),
//   w = s / sum(s) when `normalize` (Qwen3.5-MoE always, Qwen3-Next's norm_topk_prob), else s,
// returned as w in the logits' dtype and idx as int64: what transformers' Qwen3_5MoeTopKRouter /
// Qwen3NextTopKRouter return as (router_scores, router_indices).
// The backward maps d_w to d_logits (softmax and renormalisation recomputed from the logits).
#pragma once

#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta {

struct MoeRouterInputs {
  TensorRef logits;        // [T, E] f32 | f16 | bf16, any strides
  int64_t top_k = 0;       // 1 <= top_k <= E
  bool normalize = true;   // renormalise the top-k probabilities to sum to 1
  void* stream = nullptr;  // cudaStream_t for CUDA tensors
};

struct MoeRouterForwardOutputs {
  TensorRef weights;  // [T, top_k] logits' dtype, contiguous
  TensorRef indices;  // [T, top_k] int64, contiguous
};

struct MoeRouterBackwardArgs {
  TensorRef indices;    // [T, top_k] int64: the forward's
  TensorRef d_weights;  // [T, top_k] f32 | f16 | bf16, any strides
  TensorRef d_logits;   // [T, E] logits' dtype, contiguous (output)
};

void moe_router_forward(const MoeRouterInputs& in, const MoeRouterForwardOutputs& out);
void moe_router_backward(const MoeRouterInputs& in, const MoeRouterBackwardArgs& args);

}  // namespace flashdelta
