// Compiled only when flashdelta is built without its CUDA backend (no CUDA toolkit found, or
// FLASHDELTA_WITH_CUDA=0); CMakeLists.txt picks this file instead of src/cuda/*.cu.
//
// The dispatcher still links against detail::cuda::gated_delta_rule_backend(); answering nullptr
// makes it raise NotImplementedError ("built without CUDA") for CUDA tensors.
#include "core/gated_delta_rule_backend.h"

namespace flashdelta::detail::cuda {

const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind) { return nullptr; }

}  // namespace flashdelta::detail::cuda
