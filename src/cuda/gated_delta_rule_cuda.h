// The CUDA backend's tables for the gated delta rule ops, and the device guard its launches use.
#pragma once

#include <cuda_runtime.h>

#include "core/gated_delta_rule_backend.h"
#include "cuda/cuda_check.cuh"

namespace flashdelta::detail::cuda {

extern const GatedDeltaRuleBackend kFusedRecurrentGatedDeltaRule;
extern const GatedDeltaRuleBackend kChunkGatedDeltaRule;  // chunk_gated_delta_rule/launch.cu

// fused_recurrent_gated_delta_rule_backward.cu (the table is in fused_recurrent_gated_delta_rule.cu)
size_t fused_recurrent_backward_workspace_bytes(const GatedDeltaRuleShape& s,
                                                const GatedDeltaRuleInputs& in);
void fused_recurrent_backward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                              const GatedDeltaRuleBackwardInputs& gin,
                              const GatedDeltaRuleBackwardOutputs& gout);

// Makes `device` current for the scope (kernels launch on the tensors' device), then restores.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FLASHDELTA_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FLASHDELTA_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace flashdelta::detail::cuda
