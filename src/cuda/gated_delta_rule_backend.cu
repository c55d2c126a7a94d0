// CUDA backend table for the two gated delta rule ops (chunk_gated_delta_rule and
// fused_recurrent_gated_delta_rule): what the dispatcher in src/core/gated_delta_rule_dispatch.cpp
// calls for tensors on a CUDA device.
//
// Both ops have both directions: fused_recurrent_gated_delta_rule.cu (the decode path) and its
// _backward.cu, and src/cuda/chunk_gated_delta_rule/. A missing entry would make the dispatcher
// raise NotImplementedError.
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {

const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind kind) {
  switch (kind) {
    case GatedDeltaRuleKind::kChunk:
      return &kChunkGatedDeltaRule;
    case GatedDeltaRuleKind::kFusedRecurrent:
      return &kFusedRecurrentGatedDeltaRule;
  }
  return nullptr;
}

}  // namespace flashdelta::detail::cuda
