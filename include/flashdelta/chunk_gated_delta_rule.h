// flashdelta: chunked gated delta rule (chunk size 64), forward and backward.
// Same semantics as flash-linear-attention's chunk_gated_delta_rule; see gated_delta_rule.h.
#pragma once

#include "flashdelta/gated_delta_rule.h"

namespace flashdelta {

constexpr int64_t kGdnChunkSize = 64;

// Bytes of workspace the forward / backward need for these inputs (on their device); both need
// less when the forward writes `saved` and the backward is given it (with_saved): what the
// forward keeps lives there instead.
size_t chunk_gated_delta_rule_forward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                      bool with_saved = false);
size_t chunk_gated_delta_rule_backward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                       bool with_saved = false);
// Bytes of the forward's optional `saved` output (gated_delta_rule.h): on CUDA the state entering
// every chunk (bf16), the intra-chunk products (W, U, M, T, the gates' cumsum and beta) and the
// normalised K and Q; on the CPU the states alone (K x V in fp32, fp64 for fp64 inputs). The
// backward given them does not recompute them.
size_t chunk_gated_delta_rule_saved_bytes(const GatedDeltaRuleInputs& in);

void chunk_gated_delta_rule_forward(const GatedDeltaRuleInputs& in,
                                    const GatedDeltaRuleForwardOutputs& out);

// Recomputes what it needs from the inputs (what grad_in.saved holds, if given, excepted);
// d_final_state may be absent (zero).
void chunk_gated_delta_rule_backward(const GatedDeltaRuleInputs& in,
                                     const GatedDeltaRuleBackwardInputs& grad_in,
                                     const GatedDeltaRuleBackwardOutputs& grad_out);

}  // namespace flashdelta
