// flashdelta::build_info(): what this build contains, from the definitions CMakeLists.txt sets
// (FLASHDELTA_WITH_CUDA, FLASHDELTA_CUDA_ARCHS_STR) and the CPU backend's thread count.
#include "flashdelta/tensor.h"

#include <string>
#include <utility>

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
  for (const auto& [kind, name] : {std::pair{GatedDeltaRuleKind::kChunk, "chunk_gated_delta_rule"},
                                   {GatedDeltaRuleKind::kFusedRecurrent,
                                    "fused_recurrent_gated_delta_rule"}}) {
    const detail::GatedDeltaRuleBackend* b = detail::cuda::gated_delta_rule_backend(kind);
    if (b && b->forward) info.cuda_ops.push_back(std::string(name) + ".forward");
    if (b && b->backward) info.cuda_ops.push_back(std::string(name) + ".backward");
  }
#if FLASHDELTA_WITH_CUDA
  // The mixture-of-experts ops (src/cuda/moe_*.cu) are built whole, both directions.
  for (const char* name : {"moe_router", "moe_permute", "moe_unpermute", "moe_experts"}) {
    info.cuda_ops.push_back(std::string(name) + ".forward");
    info.cuda_ops.push_back(std::string(name) + ".backward");
  }
  for (const char* entry : {"causal_conv1d.forward", "causal_conv1d.backward",
                            "causal_conv1d_update.forward"}) {
    info.cuda_ops.push_back(entry);
  }
#endif
  if (info.cuda) {  // fused_linear_cross_entropy: forward and backward in every CUDA build
    info.cuda_ops.push_back("fused_linear_cross_entropy.forward");
    info.cuda_ops.push_back("fused_linear_cross_entropy.backward");
  }
  // The fused layer ops (src/cuda/rms_norm.cu, gated_product.cu, partial_rotary_embedding.cu):
  // both directions whenever the CUDA backend is built.
  if (info.cuda) {
    for (const char* op : {"rms_norm", "rms_norm_gated", "swiglu", "attention_gate",
                           "partial_rotary_embedding"}) {
      info.cuda_ops.push_back(std::string(op) + ".forward");
      info.cuda_ops.push_back(std::string(op) + ".backward");
    }
  }
  return info;
}

}  // namespace flashdelta
