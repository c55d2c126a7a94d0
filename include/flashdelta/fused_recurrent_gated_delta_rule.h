// flashdelta: token-by-token gated delta rule (the decode path), forward and backward.
// Same arguments and results as chunk_gated_delta_rule.h, computed without chunking.
#pragma once

#include "flashdelta/gated_delta_rule.h"

namespace flashdelta {

size_t fused_recurrent_gated_delta_rule_forward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                                bool with_saved = false);
size_t fused_recurrent_gated_delta_rule_backward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                                 bool with_saved = false);
// 0: this op keeps nothing for its backward (its forward ignores `saved`).
size_t fused_recurrent_gated_delta_rule_saved_bytes(const GatedDeltaRuleInputs& in);

void fused_recurrent_gated_delta_rule_forward(const GatedDeltaRuleInputs& in,
                                              const GatedDeltaRuleForwardOutputs& out);

void fused_recurrent_gated_delta_rule_backward(const GatedDeltaRuleInputs& in,
                                               const GatedDeltaRuleBackwardInputs& grad_in,
                                               const GatedDeltaRuleBackwardOutputs& grad_out);

}  // namespace flashdelta
