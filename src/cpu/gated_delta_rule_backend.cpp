#include "gated_delta_rule_cpu.h"

namespace flashdelta::detail::cpu {

const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind kind) {
  return kind == GatedDeltaRuleKind::kChunk ? &flashdelta::cpu::kChunkGatedDeltaRule
                                            : &flashdelta::cpu::kFusedRecurrentGatedDeltaRule;
}

}  // namespace flashdelta::detail::cpu
