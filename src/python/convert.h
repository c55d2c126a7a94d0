// Shared by the binding files of src/python: DLPack arrays -> flashdelta::TensorRef.
//
// Every tensor arrives through DLPack as an nb::ndarray of any dtype and device (zero copy: torch
// tensors are exported with `__dlpack__`, which refuses tensors that require grad, so callers pass
// detached tensors). Inputs are taken read-only (InArray), outputs writable (OutArray). Everything
// else (shape, dtype, device consistency) is checked by the C++ entry points.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>

#include "flashdelta/tensor.h"

namespace flashdelta::python {

namespace nb = nanobind;

using flashdelta::DType;
using flashdelta::Error;
using flashdelta::TensorRef;

using InArray = nb::ndarray<nb::ro>;  // an input: never written
using OutArray = nb::ndarray<>;       // an output or workspace
using OptInArray = std::optional<InArray>;
using OptOutArray = std::optional<OutArray>;

inline std::string dlpack_dtype_name(const nb::dlpack::dtype& dt) {
  // DLPack type codes: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool, 7-13 float8 kinds.
  const char* kind = "unknown";
  switch (dt.code) {
    case 0: kind = "int"; break;
    case 1: kind = "uint"; break;
    case 2: kind = "float"; break;
    case 4: kind = "bfloat"; break;
    case 5: kind = "complex"; break;
    case 6: return "bool";
    default:
      if (dt.code >= 7 && dt.code <= 13) kind = "float8_";
      break;
  }
  std::string name = std::string(kind) + std::to_string(dt.bits);
  if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
  return name;
}

// The flashdelta dtype of a DLPack dtype, or nullopt when flashdelta has none.
inline std::optional<DType> to_dtype(const nb::dlpack::dtype& dt) {
  if (dt.lanes != 1) return std::nullopt;
  switch (dt.code) {
    case 2:  // float
      if (dt.bits == 32) return DType::kFloat32;
      if (dt.bits == 16) return DType::kFloat16;
      if (dt.bits == 64) return DType::kFloat64;
      break;
    case 4:  // bfloat
      if (dt.bits == 16) return DType::kBFloat16;
      break;
    case 0:  // int
      if (dt.bits == 32) return DType::kInt32;
      if (dt.bits == 64) return DType::kInt64;
      break;
    case 1:  // uint
      if (dt.bits == 8) return DType::kUInt8;
      break;
    default:
      break;
  }
  return std::nullopt;
}

// Converts the arrays of one call, naming the op and the argument in every error.
struct TensorConverter {
  const char* op;

  template <typename Array>
  TensorRef operator()(const Array& a, const char* name) const {
    TensorRef t;
    t.data = const_cast<void*>(static_cast<const void*>(a.data()));  // byte offset included
    const std::optional<DType> dtype = to_dtype(a.dtype());
    if (!dtype) {
      throw Error(Error::Kind::kType, std::string(op) + ": " + name + " has dtype " +
                                          dlpack_dtype_name(a.dtype()) +
                                          ", which flashdelta does not support (float32, "
                                          "float16, bfloat16, float64, int32, int64, uint8)");
    }
    t.dtype = *dtype;
    if (a.device_type() == nb::device::cpu::value) {
      t.device = {flashdelta::DeviceType::kCPU, 0};
    } else if (a.device_type() == nb::device::cuda::value) {
      t.device = {flashdelta::DeviceType::kCUDA, a.device_id()};
    } else {
      throw Error(Error::Kind::kValue, std::string(op) + ": " + name +
                                           " is on a device flashdelta does not support "
                                           "(DLPack device type " +
                                           std::to_string(a.device_type()) +
                                           "); use cpu or cuda tensors");
    }
    const size_t rank = a.ndim();
    if (rank > static_cast<size_t>(flashdelta::kMaxRank)) {
      throw Error(Error::Kind::kValue, std::string(op) + ": " + name + " has " +
                                           std::to_string(rank) + " dimensions, more than any "
                                           "flashdelta argument takes");
    }
    t.rank = static_cast<int>(rank);
    for (size_t d = 0; d < rank; ++d) {
      t.shape[d] = static_cast<int64_t>(a.shape(d));
      t.strides[d] = static_cast<int64_t>(a.stride(d));  // elements, as in DLPack
    }
    return t;
  }

  template <typename Array>
  TensorRef operator()(const std::optional<Array>& a, const char* name) const {
    return a ? (*this)(*a, name) : TensorRef{};  // absent
  }
};


}  // namespace flashdelta::python
