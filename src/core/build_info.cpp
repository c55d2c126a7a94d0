// flashdelta::build_info(): what this build contains, from the definitions CMakeLists.txt sets
// (FLASHDELTA_WITH_CUDA, FLASHDELTA_CUDA_ARCHS_STR) and the CPU backend's thread count.
#include "flashdelta/tensor.h"

#include "core/gated_delta_rule_backend.h"
#include "cpu/parallel.h"

#ifndef FLASHDELTA_WITH_CUDA
#define FLASHDELTA_WITH_CUDA 0
#endif
#ifndef FLASHDELTA_CUDA_ARCHS_STR
#define FLASHDELTA_CUDA_ARCHS_STR ""
#endif

namespace flashdelta {

BuildInfo build_info() {
  BuildInfo info;
  info.cuda = FLASHDELTA_WITH_CUDA != 0;
  info.cuda_archs = info.cuda ? FLASHDELTA_CUDA_ARCHS_STR : "";
  info.cpu_threads = cpu::num_threads();
  using detail::GatedDeltaRuleKind;
  if (detail::cuda::gated_delta_rule_backend(GatedDeltaRuleKind::kChunk))
    info.cuda_ops.push_back("chunk_gated_delta_rule");
  if (detail::cuda::gated_delta_rule_backend(GatedDeltaRuleKind::kFusedRecurrent))
    info.cuda_ops.push_back("fused_recurrent_gated_delta_rule");
  return info;
}

}  // namespace flashdelta
