// flashdelta: framework-free tensor view and error type shared by every op.
//
// A TensorRef is what crosses the C++ API: a pointer, a dtype, a device, a shape and strides
// (in elements). It owns nothing. A default-constructed TensorRef is "absent" (rank -1) and is
// how optional arguments are passed.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace flashdelta {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16, kFloat64, kInt32, kInt64, kUInt8 };
enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

constexpr int kMaxRank = 6;

struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int rank = -1;  // -1: absent (optional argument not given)
  int64_t shape[kMaxRank] = {};
  int64_t strides[kMaxRank] = {};  // in elements, not bytes

  bool defined() const { return rank >= 0; }
  int64_t size(int d) const { return shape[d < 0 ? d + rank : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + rank : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    int64_t expected = 1;
    for (int i = rank - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
};

// Build a contiguous TensorRef (tests and C++ callers).
TensorRef make_tensor_ref(void* data, DType dtype, std::initializer_list<int64_t> shape,
                          Device device = Device{});

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::string shape_string(const TensorRef& t);

// Every error flashdelta raises. `kind` says which Python exception it maps to.
class Error : public std::runtime_error {
 public:
  enum class Kind { kValue, kType, kNotImplemented, kRuntime };
  Error(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// What this build contains.
struct BuildInfo {
  bool cuda = false;        // CUDA backend compiled in
  std::string cuda_archs;   // e.g. "90a;80"
  int cpu_threads = 1;      // worker threads the CPU backend uses
  // CUDA kernels in this build, as "op.forward" / "op.backward" entries.
  std::vector<std::string> cuda_ops;
};
BuildInfo build_info();

}  // namespace flashdelta
