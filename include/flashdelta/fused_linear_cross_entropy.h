// flashdelta: fused linear + cross-entropy (the causal-LM loss head), forward and backward.
//
// For hidden states X [N, H], an LM-head weight W [V, H] and targets t [N]:
//
//   logits    z_i   = round_to_dtype(X_i W^T)            (fp32 accumulation, then rounded to the
//                                                          inputs' dtype as F.linear does)
//   loss_sum        = sum_{i : t_i != ignore_index} ( logsumexp(z_i) - z_i[t_i] )
//   num_valid       = #{i : t_i != ignore_index}
//
// and, in the same pass, the gradients of loss_sum: d_hidden_sum = D W, d_weight_sum = D^T X with
// D_i = softmax(z_i) - onehot(t_i) (0 for ignored rows). The [N, V] logits are never held: the
// forward works through chunks of `chunk_rows` tokens whose [chunk_rows, V] logits live in the
// workspace. Callers turn the sum into a mean (loss_sum / num_valid) or a sum over
// num_items_in_batch themselves, and the backward scales the stored gradients by one scalar
// (grad_output / denominator), read on the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta {

struct FusedLinearCrossEntropyInputs {
  TensorRef hidden;  // [N, H] bf16 / fp16 / fp32, unit stride along H (any row stride)
  TensorRef weight;  // [V, H] hidden's dtype, contiguous
  TensorRef target;  // [N] int64 or int32: class index in [0, V) or ignore_index
  int64_t ignore_index = -100;
  int64_t chunk_rows = 0;   // tokens per chunk; 0: the backend's choice (bounded workspace)
  bool weight_grad = false; // also compute d_weight_sum
  void* stream = nullptr;   // cudaStream_t for CUDA tensors
};

struct FusedLinearCrossEntropyForwardOutputs {
  TensorRef loss_sum;      // [1] fp32
  TensorRef num_valid;     // [1] fp32 (an exact integer count)
  TensorRef d_hidden_sum;  // [N, H] fp32, contiguous: d loss_sum / d hidden
  TensorRef d_weight_sum;  // [V, H] weight's dtype, contiguous; required iff weight_grad
  TensorRef workspace;     // uint8, fused_linear_cross_entropy_workspace_bytes(in) bytes
};

struct FusedLinearCrossEntropyBackwardArgs {
  TensorRef grad_scale;    // [1] fp32: grad_output / denominator
  TensorRef d_hidden_sum;  // [N, H] fp32, contiguous (from the forward)
  TensorRef d_weight_sum;  // [V, H], contiguous (from the forward); absent: no d_weight
  TensorRef d_hidden;      // out [N, H] in hidden's dtype, contiguous
  TensorRef d_weight;      // out [V, H] in d_weight_sum's dtype, contiguous; iff d_weight_sum.
                           // May be d_weight_sum itself: scaled in place, the weight gradient
                           // then needs no second [V, H] buffer (what the Python op does)
  void* stream = nullptr;
};

// Tokens per chunk the forward will use for these inputs.
int64_t fused_linear_cross_entropy_chunk_rows(const FusedLinearCrossEntropyInputs& in);
size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyInputs& in);

void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out);

// d_hidden = grad_scale * d_hidden_sum, d_weight = grad_scale * d_weight_sum. d_hidden_sum is
// unchanged; d_weight_sum too unless d_weight is d_weight_sum (in place).
void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& args);

}  // namespace flashdelta
