// flashdelta: rotate-half rotary position embedding over the first rotary_dim channels of each
// head, on q and k together (the rest of each head is passed through), forward and backward.
//
// With h = rotary_dim / 2, for i < h (c, s: cos and sin of the token):
//   y[i]     = x[i] c[i]         - x[i + h] s[i]
//   y[i + h] = x[i + h] c[i + h] + x[i] s[i + h]
//   y[j]     = x[j]              for j >= rotary_dim
// each product and the sum rounded to the storage dtype as transformers' apply_rotary_pos_emb
// does. cos / sin are what the model's rotary module gives ([B, T, rotary_dim]; they need not be
// symmetric in their two halves, so interleaved multimodal RoPE of text-only input works).
// The backward applies the transposed rotation to dq_out / dk_out (no gradient for cos / sin).
#pragma once

#include "flashdelta/tensor.h"

namespace flashdelta {

struct PartialRotaryEmbeddingArgs {
  TensorRef q;    // [B, T, H, head_dim] f32 | f16 | bf16, stride(3) == 1, any other strides
  TensorRef k;    // [B, T, HK, head_dim] q's dtype, stride(3) == 1
  TensorRef cos;  // [B, T, rotary_dim] q's dtype, stride(2) == 1 (stride 0 along B allowed)
  TensorRef sin;  // [B, T, rotary_dim] as cos
  void* stream = nullptr;
};

// Forward: q_out = rope(q), k_out = rope(k) (shapes of q / k, stride(3) == 1, any other strides;
// they must not overlap the inputs).
void partial_rotary_embedding_forward(const PartialRotaryEmbeddingArgs& in, const TensorRef& q_out,
                                      const TensorRef& k_out);
// Backward: `in.q` / `in.k` hold dq_out / dk_out; writes dq / dk (the transposed rotation).
void partial_rotary_embedding_backward(const PartialRotaryEmbeddingArgs& grads_out,
                                       const TensorRef& dq, const TensorRef& dk);

}  // namespace flashdelta
