// Shared by moe_experts.cu and moe_experts_backward.cu: the grouped GEMM and the alignment test
// that decides whether its loads may be 16-byte vectors.
#pragma once

#include <cstdint>

#include "cuda/moe_grouped_gemm.cuh"

namespace flashdelta::detail::cuda::moe {

// A 2-byte-element matrix can be read in 16-byte chunks when its base is 16-byte aligned and its
// leading dimension (and the per-expert stride) keep every row 16-byte aligned.
inline bool vector_friendly(const void* base, int64_t ld, int64_t expert_stride = 0) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ld % 8 == 0 && expert_stride % 8 == 0;
}

}  // namespace flashdelta::detail::cuda::moe
