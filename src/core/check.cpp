#include "check.h"

namespace flashdelta::detail {

std::string shape_of(std::initializer_list<int64_t> dims) {
  std::ostringstream s;
  s << "[";
  bool first = true;
  for (int64_t d : dims) {
    s << (first ? "" : ", ") << d;
    first = false;
  }
  s << "]";
  return s.str();
}

const char* device_name(const Device& d) { return d.type == DeviceType::kCPU ? "cpu" : "cuda"; }

void check_present(const TensorRef& t, const char* op, const char* name) {
  if (!t.defined()) fail(Error::Kind::kValue, op, ": ", name, " is required but was not given");
}

void check_rank(const TensorRef& t, int rank, const char* op, const char* name,
                const char* layout) {
  check_present(t, op, name);
  if (t.rank != rank) {
    fail(Error::Kind::kValue, op, ": ", name, " must have ", rank, " dimensions ", layout,
         ", got ", t.rank, " with shape ", shape_string(t));
  }
}

void check_dtype_in(const TensorRef& t, std::initializer_list<DType> allowed, const char* op,
                    const char* name) {
  for (DType d : allowed) {
    if (t.dtype == d) return;
  }
  std::ostringstream s;
  bool first = true;
  for (DType d : allowed) {
    s << (first ? "" : ", ") << dtype_name(d);
    first = false;
  }
  fail(Error::Kind::kType, op, ": ", name, " must have dtype in {", s.str(), "}, got ",
       dtype_name(t.dtype));
}

void check_same_dtype(const TensorRef& t, const TensorRef& ref, const char* op, const char* name,
                      const char* ref_name) {
  if (t.dtype != ref.dtype) {
    fail(Error::Kind::kType, op, ": ", name, " must have the dtype of ", ref_name, " (",
         dtype_name(ref.dtype), "), got ", dtype_name(t.dtype));
  }
}

void check_same_device(const TensorRef& t, const TensorRef& ref, const char* op, const char* name,
                       const char* ref_name) {
  if (t.device != ref.device) {
    fail(Error::Kind::kValue, op, ": ", name, " is on ", device_name(t.device), ":",
         t.device.index, " but ", ref_name, " is on ", device_name(ref.device), ":",
         ref.device.index, "; all tensors must be on one device");
  }
}

void check_shape(const TensorRef& t, std::initializer_list<int64_t> expected, const char* op,
                 const char* name, const char* layout) {
  check_present(t, op, name);
  bool ok = t.rank == static_cast<int>(expected.size());
  int i = 0;
  for (int64_t e : expected) {
    if (ok && t.shape[i] != e) ok = false;
    ++i;
  }
  if (!ok) {
    fail(Error::Kind::kValue, op, ": ", name, " must have shape ", layout, " = ",
         shape_of(expected), ", got ", shape_string(t));
  }
}

void check_workspace(const TensorRef& t, size_t bytes, const Device& device, const char* op,
                     const char* name) {
  if (bytes == 0) return;
  check_present(t, op, name);
  if (t.dtype != DType::kUInt8 || t.rank != 1 || !t.is_contiguous()) {
    fail(Error::Kind::kType, op, ": ", name, " must be a contiguous 1-d uint8 tensor, got ",
         dtype_name(t.dtype), " with shape ", shape_string(t));
  }
  if (static_cast<size_t>(t.shape[0]) < bytes) {
    fail(Error::Kind::kValue, op, ": ", name, " must hold at least ", bytes, " bytes, got ",
         t.shape[0]);
  }
  if (t.device != device) {
    fail(Error::Kind::kValue, op, ": ", name, " is on ", device_name(t.device),
         " but the inputs are on ", device_name(device));
  }
}

}  // namespace flashdelta::detail
