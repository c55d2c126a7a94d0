// How causal_conv1d reaches a backend: src/core/causal_conv1d.cpp validates, then calls the
// functions of the inputs' device declared here (src/cpu/causal_conv1d.cpp, and
// src/cuda/causal_conv1d.cu when FLASHDELTA_WITH_CUDA).
#pragma once

#include <cstddef>

#include "flashdelta/causal_conv1d.h"

namespace flashdelta::detail {

// The sizes of one causal_conv1d_update call, after validation.
struct CausalConv1dUpdateShape {
  int64_t batch = 0;      // B
  int64_t channels = 0;   // C
  int64_t new_tokens = 0; // L
  int64_t state_len = 0;  // S
  int64_t width = 0;      // W
};

// The CUDA kernels take W in [kCudaMinWidth, kCudaMaxWidth] (templates; the CPU takes any W).
constexpr int64_t kCausalConv1dCudaMinWidth = 2;
constexpr int64_t kCausalConv1dCudaMaxWidth = 4;

namespace cpu {
size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dShape& s);
void causal_conv1d_forward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                           const CausalConv1dForwardOutputs& out);
void causal_conv1d_backward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                            const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout);
void causal_conv1d_update(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a);
}  // namespace cpu

namespace cuda {
size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dShape& s);
void causal_conv1d_forward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                           const CausalConv1dForwardOutputs& out);
void causal_conv1d_backward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                            const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout);
void causal_conv1d_update(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a);
}  // namespace cuda

}  // namespace flashdelta::detail
