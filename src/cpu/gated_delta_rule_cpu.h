// The CPU backend's tables for the two gated delta rule ops.
#pragma once

#include "../core/gated_delta_rule_backend.h"

namespace flashdelta::cpu {
extern const ::flashdelta::detail::GatedDeltaRuleBackend kChunkGatedDeltaRule;
extern const ::flashdelta::detail::GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule;
}  // namespace flashdelta::cpu
