// CUDA backend table for the two gated delta rule ops (chunk_gated_delta_rule and
// fused_recurrent_gated_delta_rule): what the dispatcher in src/core/gated_delta_rule_dispatch.cpp
// calls for tensors on a CUDA device.
//
// fused_recurrent_gated_delta_rule has its forward (the decode path), chunk_gated_delta_rule its
// forward and backward (src/cuda/chunk_gated_delta_rule/); the token-by-token backward is still
// missing: a missing entry makes the dispatcher raise NotImplementedError.
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
