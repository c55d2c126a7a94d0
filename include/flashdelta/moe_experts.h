// flashdelta: the experts of a mixture-of-experts layer as grouped GEMMs, over transformers' own
// parameter layouts (Qwen3_5MoeExperts / Qwen3NextExperts), with the SwiGLU fused.
//
// Rows come sorted by expert (moe_permute): rows [expert_offsets[e], expert_offsets[e + 1]) belong
// to expert e; rows from expert_offsets[E] on (dropped pairs) get zero output and gradient.
// For a row x of expert e, with W1 = gate_up_proj[e] ([2I, H]) and W2 = down_proj[e] ([H, I]):
//   gate_up = x W1^T  (g = gate_up[:I], u = gate_up[I:]),  act = silu(g) * u,  out = act W2^T.
// gate_up and act are rounded to the storage dtype (as transformers' bf16 path does); products
// accumulate in fp32.
#pragma once

#include "flashdelta/tensor.h"

namespace flashdelta {

struct MoeExpertsInputs {
  TensorRef hidden;          // [N, H] f16 | bf16 (| f32 on CPU), unit stride along H
  TensorRef expert_offsets;  // [E + 1] int32, non-decreasing, expert_offsets[0] = 0, [E] <= N
  TensorRef gate_up_proj;    // [E, 2I, H] hidden's dtype, unit stride along H
  TensorRef down_proj;       // [E, H, I] hidden's dtype, unit stride along I
  void* stream = nullptr;
};

struct MoeExpertsForwardOutputs {
  TensorRef out;      // [N, H] contiguous
  TensorRef gate_up;  // [N, 2I] contiguous: kept for the backward
  TensorRef act;      // [N, I] contiguous: silu(g) * u, the second GEMM's input
};

struct MoeExpertsBackwardArgs {
  TensorRef d_out;         // [N, H] unit stride along H
  TensorRef gate_up;       // [N, 2I] the forward's
  TensorRef d_hidden;      // [N, H] contiguous (output)
  TensorRef d_gate_up_proj;  // optional [E, 2I, H] contiguous (output; frozen experts: absent)
  TensorRef d_down_proj;     // optional [E, H, I] contiguous (output)
  TensorRef d_gate_up;     // [N, 2I] contiguous scratch
  TensorRef act;           // [N, I] contiguous scratch (recomputed when d_down_proj is asked)
};

void moe_experts_forward(const MoeExpertsInputs& in, const MoeExpertsForwardOutputs& out);
// The backward reads hidden's elements only for d_gate_up_proj; without it, hidden gives the
// shape, dtype and device alone (frozen experts need not keep the forward's rows: any [N, H]
// tensor of hidden's dtype and device will do, e.g. d_out).
void moe_experts_backward(const MoeExpertsInputs& in, const MoeExpertsBackwardArgs& args);

}  // namespace flashdelta
