// flashdelta: the two "value times activated gate" products of the Qwen3.5 layers, forward and
// backward. They have one shape and share one implementation (src/*/gated_product.*):
//
//   swiglu          out = silu(gate) * up        (the dense MLP and the shared expert)
//   attention_gate  out = attn * sigmoid(gate)   (the output gate of the gated full attention)
//
// computed as transformers' compositions round: the activation is rounded to the storage dtype,
// then the product is (so bf16 results equal transformers' bit for bit). The backward recomputes
// the activation from gate (nothing is stored beyond the inputs).
// Tensors are [R, D] with unit stride along D and any row stride (the attention gate is a strided
// view of q_proj's output: no copy).
#pragma once

#include "flashdelta/tensor.h"

namespace flashdelta {

struct GatedProductArgs {
  TensorRef value;  // [R, D] f32 | f16 | bf16 (up, or attn); stride(1) == 1
  TensorRef gate;   // [R, D] value's dtype; stride(1) == 1
  void* stream = nullptr;  // cudaStream_t for CUDA tensors; ignored on CPU
};

struct GatedProductGradients {
  TensorRef d_out;    // [R, D] value's dtype, stride(1) == 1
  TensorRef d_value;  // [R, D] (written)
  TensorRef d_gate;   // [R, D] (written)
};

// out: [R, D] value's dtype, stride(1) == 1.
void swiglu_forward(const GatedProductArgs& in, const TensorRef& out);
void swiglu_backward(const GatedProductArgs& in, const GatedProductGradients& grads);
void attention_gate_forward(const GatedProductArgs& in, const TensorRef& out);
void attention_gate_backward(const GatedProductArgs& in, const GatedProductGradients& grads);

}  // namespace flashdelta
