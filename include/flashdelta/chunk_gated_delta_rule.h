// flashdelta: chunked gated delta rule (chunk size 64), forward and backward.
// Same semantics as flash-linear-attention's chunk_gated_delta_rule; see gated_delta_rule.h.
#pragma once

#include "flashdelta/gated_delta_rule.h"

namespace flashdelta {

constexpr int64_t kGdnChunkSize = 64;

// Bytes of workspace the forward / backward need for these inputs (on their device).
size_t chunk_gated_delta_rule_forward_workspace_bytes(const GatedDeltaRuleInputs& in);
size_t chunk_gated_delta_rule_backward_workspace_bytes(const GatedDeltaRuleInputs& in);

void chunk_gated_delta_rule_forward(const GatedDeltaRuleInputs& in,
                                    const GatedDeltaRuleForwardOutputs& out);

// Recomputes what it needs from the inputs; d_final_state may be absent (zero).
void chunk_gated_delta_rule_backward(const GatedDeltaRuleInputs& in,
                                     const GatedDeltaRuleBackwardInputs& grad_in,
                                     const GatedDeltaRuleBackwardOutputs& grad_out);

}  // namespace flashdelta
