// How fused_linear_cross_entropy reaches its backends: src/core validates and picks the chunk
// size, then calls the functions of the inputs' device (src/cpu, src/cuda).
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashdelta/fused_linear_cross_entropy.h"

namespace flashdelta::detail {

// Sizes of one validated call.
struct FusedLinearCrossEntropyShape {
  int64_t num_tokens = 0;   // N
  int64_t hidden_size = 0;  // H
  int64_t vocab_size = 0;   // V
  int64_t chunk_rows = 0;   // tokens per chunk, in [1, N] (0 when N == 0)
};

namespace cpu {
size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyShape& shape,
                                                  const FusedLinearCrossEntropyInputs& in);
void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyShape& shape,
                                        const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out);
void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& args);
}  // namespace cpu

namespace cuda {
size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyShape& shape,
                                                  const FusedLinearCrossEntropyInputs& in);
void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyShape& shape,
                                        const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out);
void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& args);
}  // namespace cuda

}  // namespace flashdelta::detail
