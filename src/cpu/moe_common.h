// What the CPU mixture-of-experts kernels share: dtype dispatch over the storage types and
// element loads/stores through a TensorRef's strides.
#pragma once

#include <cstdint>

#include "cpu/convert.h"
#include "flashdelta/tensor.h"

namespace flashdelta::cpu::moe {

// Calls f(Storage{}) with the storage type of a float dtype (f32, f16, bf16).
template <typename F>
void visit_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(f16{}); break;
    case DType::kBFloat16: f(bf16{}); break;
    default: throw Error(Error::Kind::kType, "moe: unsupported dtype on the cpu");
  }
}

// The value at [i, j] of a 2-d float tensor of any float dtype, as float.
inline float load2(const TensorRef& t, int64_t i, int64_t j) {
  const int64_t off = i * t.strides[0] + j * t.strides[1];
  switch (t.dtype) {
    case DType::kFloat32: return static_cast<const float*>(t.data)[off];
    case DType::kFloat16: return to_float(static_cast<const f16*>(t.data)[off]);
    case DType::kBFloat16: return to_float(static_cast<const bf16*>(t.data)[off]);
    default: return 0.0f;
  }
}

// The value at [i, j] of a 2-d int32 / int64 tensor.
inline int64_t load_index2(const TensorRef& t, int64_t i, int64_t j) {
  const int64_t off = i * t.strides[0] + j * t.strides[1];
  return t.dtype == DType::kInt64 ? static_cast<const int64_t*>(t.data)[off]
                                  : static_cast<const int32_t*>(t.data)[off];
}

// Rounds x to the storage type of a contiguous float tensor and stores it at flat index i.
inline void store_flat(const TensorRef& t, int64_t i, float x) {
  switch (t.dtype) {
    case DType::kFloat32: static_cast<float*>(t.data)[i] = x; break;
    case DType::kFloat16: static_cast<f16*>(t.data)[i] = from_float<f16>(x); break;
    case DType::kBFloat16: static_cast<bf16*>(t.data)[i] = from_float<bf16>(x); break;
    default: break;
  }
}

// x rounded to the precision of a float dtype (what a store and a load would give).
inline float round_to(DType dtype, float x) {
  switch (dtype) {
    case DType::kFloat16: return to_float(from_float<f16>(x));
    case DType::kBFloat16: return to_float(from_float<bf16>(x));
    default: return x;
  }
}

}  // namespace flashdelta::cpu::moe
