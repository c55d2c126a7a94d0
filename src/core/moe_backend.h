// The mixture-of-experts ops' backend entry points (src/cpu/moe_*.cpp, src/cuda/moe_*.cu). They
// receive validated arguments (src/core/moe.cpp) and the problem sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashdelta/moe_experts.h"
#include "flashdelta/moe_permute.h"
#include "flashdelta/moe_router.h"

namespace flashdelta::detail {

struct MoeRouterShape {
  int64_t num_tokens = 0;   // T
  int64_t num_experts = 0;  // E
  int64_t top_k = 0;
};

struct MoePermuteShape {
  int64_t num_tokens = 0;   // T
  int64_t top_k = 0;
  int64_t num_pairs = 0;    // T * top_k
  int64_t hidden = 0;       // H
  int64_t num_experts = 0;  // E
};

struct MoeExpertsShape {
  int64_t num_rows = 0;      // N
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I
  int64_t num_experts = 0;   // E
};

#define FLASHDELTA_MOE_BACKEND_FUNCTIONS                                                        \
  void moe_router_forward(const MoeRouterShape&, const MoeRouterInputs&,                        \
                          const MoeRouterForwardOutputs&);                                      \
  void moe_router_backward(const MoeRouterShape&, const MoeRouterInputs&,                       \
                           const MoeRouterBackwardArgs&);                                       \
  size_t moe_permute_workspace_bytes(const MoePermuteShape&);                                   \
  void moe_permute(const MoePermuteShape&, const MoePermuteArgs&);                              \
  void moe_unpermute_forward(const MoePermuteShape&, const MoeUnpermuteArgs&);                  \
  void moe_unpermute_backward(const MoePermuteShape&, const MoeUnpermuteArgs&,                  \
                              const MoeUnpermuteBackwardArgs&);                                 \
  void moe_experts_forward(const MoeExpertsShape&, const MoeExpertsInputs&,                     \
                           const MoeExpertsForwardOutputs&);                                    \
  void moe_experts_backward(const MoeExpertsShape&, const MoeExpertsInputs&,                    \
                            const MoeExpertsBackwardArgs&);

namespace cpu {
FLASHDELTA_MOE_BACKEND_FUNCTIONS
}
namespace cuda {
FLASHDELTA_MOE_BACKEND_FUNCTIONS
}

#undef FLASHDELTA_MOE_BACKEND_FUNCTIONS

}  // namespace flashdelta::detail
