// Argument checks shared by the entry points: each throws flashdelta::Error naming the argument
// and saying what was expected and what was given.
#pragma once

#include <initializer_list>
#include <sstream>
#include <string>

#include "flashdelta/tensor.h"

namespace flashdelta::detail {

template <typename... Parts>
[[noreturn]] void fail(Error::Kind kind, const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw Error(kind, s.str());
}

template <typename... Parts>
void check_value(bool ok, const Parts&... parts) {
  if (!ok) fail(Error::Kind::kValue, parts...);
}

void check_present(const TensorRef& t, const char* op, const char* name);
void check_rank(const TensorRef& t, int rank, const char* op, const char* name,
                const char* layout);
void check_dtype_in(const TensorRef& t, std::initializer_list<DType> allowed, const char* op,
                    const char* name);
void check_same_dtype(const TensorRef& t, const TensorRef& ref, const char* op, const char* name,
                      const char* ref_name);
void check_same_device(const TensorRef& t, const TensorRef& ref, const char* op, const char* name,
                       const char* ref_name);
// t must have exactly `expected` as shape (layout names the dims, e.g. "[B, T, HV]").
void check_shape(const TensorRef& t, std::initializer_list<int64_t> expected, const char* op,
                 const char* name, const char* layout);
// A uint8 buffer of at least `bytes` on `device` (nothing is checked when bytes is 0); `name`
// is the argument the errors name.
void check_workspace(const TensorRef& t, size_t bytes, const Device& device, const char* op,
                     const char* name = "workspace");

std::string shape_of(std::initializer_list<int64_t> dims);

// The NotImplementedError of a CUDA tensor given to a build without the CUDA backend.
[[noreturn]] inline void fail_without_cuda(const char* op) {
  fail(Error::Kind::kNotImplemented, op,
       ": this build of flashdelta has no cuda kernel for this op (it was built without CUDA: "
       "set FLASHDELTA_WITH_CUDA=1 and a CUDA toolkit)");
}
const char* device_name(const Device& d);

}  // namespace flashdelta::detail
