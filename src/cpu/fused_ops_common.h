// Helpers shared by the CPU fused layer ops (rms_norm.cpp, gated_product.cpp,
// partial_rotary_embedding.cpp): dtype dispatch, storage rounding, strided row pointers.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/convert.h"
#include "flashdelta/tensor.h"

namespace flashdelta::cpu {

// x rounded to the storage type T and back (what a torch op producing a T tensor does).
template <typename T>
inline float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Element i of a contiguous float tensor of any float dtype.
inline float load_any(const TensorRef& t, int64_t i) {
  switch (t.dtype) {
    case DType::kBFloat16: return to_float(static_cast<const bf16*>(t.data)[i]);
    case DType::kFloat16: return to_float(static_cast<const f16*>(t.data)[i]);
    default: return static_cast<const float*>(t.data)[i];
  }
}

inline void store_any(const TensorRef& t, int64_t i, float v) {
  switch (t.dtype) {
    case DType::kBFloat16: static_cast<bf16*>(t.data)[i] = from_float<bf16>(v); break;
    case DType::kFloat16: static_cast<f16*>(t.data)[i] = from_float<f16>(v); break;
    default: static_cast<float*>(t.data)[i] = v; break;
  }
}

// Row `r` of a [R, D] tensor with unit inner stride.
template <typename T>
inline T* row_ptr(const TensorRef& t, int64_t r) {
  return static_cast<T*>(t.data) + r * t.stride(0);
}

// Calls f(T{}) with T the storage type of `dtype` (f32, f16 or bf16).
template <typename F>
inline void dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16: f(bf16{}); break;
    case DType::kFloat16: f(f16{}); break;
    default: f(float{}); break;
  }
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace flashdelta::cpu
