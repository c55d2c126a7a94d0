// flashdelta: token permutation for mixture-of-experts (moe_permute) and its inverse with the
// routing-weight combine (moe_unpermute).
//
// A routing assigns each token t of T to top_k experts: indices[t, j] (a "pair" p = t * top_k + j).
// moe_permute sorts the T * top_k pairs by expert with a stable counting sort (histogram, exclusive
// scan, scatter; no comparison sort, no host synchronisation, deterministic) and gathers the rows:
//   sorted_pairs[q]     = the pair at sorted position q (ascending expert, then ascending p)
//   pair_position[p]    = its sorted position (the inverse permutation)
//   expert_offsets[e]   = first sorted position of expert e; expert_offsets[E] = valid pairs
//   permuted[q, :]      = hidden[sorted_pairs[q] / top_k, :]
// Expert ids outside [0, E) (transformers' expert-parallel sentinels) are dropped: those pairs
// sort after expert_offsets[E], and moe_experts writes zeros for them.
//
// moe_unpermute combines expert outputs back per token, in the fixed order j = 0 .. top_k - 1,
// accumulating in fp32:  out[t, :] = sum_j weights[t, j] * rows[pair_position[t * top_k + j], :]
// (weights absent: 1). It is also moe_permute's backward (without weights).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta {

struct MoePermuteArgs {
  TensorRef hidden;          // [T, H] f32 | f16 | bf16, unit stride along H
  TensorRef indices;         // [T, top_k] int32 | int64, any strides
  int64_t num_experts = 0;   // E
  TensorRef permuted;        // [T * top_k, H] hidden's dtype, contiguous (output)
  TensorRef sorted_pairs;    // [T * top_k] int32 (output)
  TensorRef pair_position;   // [T * top_k] int32 (output)
  TensorRef expert_offsets;  // [E + 1] int32 (output)
  TensorRef workspace;       // uint8 [moe_permute_workspace_bytes(...)]
  void* stream = nullptr;
};

// Scratch the device sort needs (0 on the CPU).
size_t moe_permute_workspace_bytes(const MoePermuteArgs& args);
void moe_permute(const MoePermuteArgs& args);

struct MoeUnpermuteArgs {
  TensorRef rows;           // [T * top_k, H] f32 | f16 | bf16, contiguous (sorted order)
  TensorRef weights;        // optional [T, top_k] f32 | f16 | bf16, any strides
  TensorRef pair_position;  // [T * top_k] int32 (from moe_permute)
  TensorRef out;            // [T, H] rows' dtype, contiguous (output)
  void* stream = nullptr;
};

void moe_unpermute_forward(const MoeUnpermuteArgs& args);

// d_rows[pair_position[p]] = weights[p] * d_out[t];  d_weights[p] = <d_out[t], rows[position]>.
struct MoeUnpermuteBackwardArgs {
  TensorRef d_out;      // [T, H] rows' dtype, unit stride along H
  TensorRef d_rows;     // [T * top_k, H] rows' dtype, contiguous (output)
  TensorRef d_weights;  // [T, top_k] weights' dtype, contiguous (output; required iff weights)
};

void moe_unpermute_backward(const MoeUnpermuteArgs& args, const MoeUnpermuteBackwardArgs& grads);

}  // namespace flashdelta
