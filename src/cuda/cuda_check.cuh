// FLASHDELTA_CUDA_CHECK(expr): evaluate a CUDA runtime call and turn a failure into
// flashdelta::Error (kind kRuntime, so Python sees RuntimeError) that names the call, the
// file:line and the runtime's own message.
//
// Use it on every runtime call of the CUDA backend, and after each kernel launch as
// FLASHDELTA_CUDA_CHECK(cudaGetLastError()) (launch errors only: this never synchronises, so it
// stays legal inside CUDA graph capture).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* expr, const char* file,
                                          int line) {
  throw Error(Error::Kind::kRuntime, std::string("CUDA error at ") + file + ":" +
                                         std::to_string(line) + ": " + expr + " failed: " +
                                         cudaGetErrorName(status) + " (" +
                                         cudaGetErrorString(status) + ")");
}

}  // namespace flashdelta::detail::cuda

#define FLASHDELTA_CUDA_CHECK(expr)                                                        \
  do {                                                                                     \
    const cudaError_t flashdelta_cuda_status_ = (expr);                                    \
    if (flashdelta_cuda_status_ != cudaSuccess) {                                          \
      ::flashdelta::detail::cuda::throw_cuda_error(flashdelta_cuda_status_, #expr, __FILE__, \
                                                   __LINE__);                              \
    }                                                                                      \
  } while (0)
