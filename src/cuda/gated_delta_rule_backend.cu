// CUDA backend table for the two gated delta rule ops (chunk_gated_delta_rule and
// fused_recurrent_gated_delta_rule): what the dispatcher in src/core/gated_delta_rule_dispatch.cpp
// calls for tensors on a CUDA device.
//
// Skeleton for now: no CUDA kernel exists yet, so every kind answers nullptr and the dispatcher
// raises NotImplementedError for CUDA tensors. Issue 4 (the CUDA kernels) fills this table with
// the sm_90a / sm_80 kernels, one file (or folder) per op beside this one.
#include "core/gated_delta_rule_backend.h"

namespace flashdelta::detail::cuda {

const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind kind) {
  switch (kind) {
    case GatedDeltaRuleKind::kChunk:
    case GatedDeltaRuleKind::kFusedRecurrent:
      return nullptr;
  }
  return nullptr;
}

}  // namespace flashdelta::detail::cuda
