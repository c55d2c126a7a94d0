// Checks of outputs and gradients shared by the two gated delta rule entry points.
#pragma once

#include "check.h"
#include "flashdelta/gated_delta_rule.h"

namespace flashdelta::detail {

void check_forward_outputs(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                           const GatedDeltaRuleForwardOutputs& out, size_t workspace_bytes,
                           size_t saved_bytes, const char* op);
void check_backward_args(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                         const GatedDeltaRuleBackwardInputs& gin,
                         const GatedDeltaRuleBackwardOutputs& gout, size_t workspace_bytes,
                         size_t saved_bytes, const char* op);

}  // namespace flashdelta::detail
