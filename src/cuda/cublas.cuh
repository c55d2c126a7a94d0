// cuBLAS for the CUDA backend, loaded with dlopen at first use.
//
// flashdelta._C must import on machines without CUDA libraries, so cuBLAS is never a link-time
// dependency: the first GEMM opens libcublas.so.<major of the headers we compiled against> (on a
// GPU machine torch has normally loaded it already, and dlopen returns that copy), resolves the
// few entry points below and keeps them for the life of the process. When the library is absent,
// the op raises RuntimeError naming it.
//
// One cuBLAS handle per device, created at first use on that device, and shared: a CublasSession
// holds its lock, points it at the caller's stream and issues GEMMs, so concurrent host threads
// never race on it.
//
// CUDA graphs: an op may be captured without any eager call before it.
//   - The handle may be created while the caller's stream is capturing: cublasCreate may allocate
//     device memory, which global capture mode forbids, so it runs with this thread's capture mode
//     switched to relaxed (cudaThreadExchangeStreamCaptureMode) and then restored.
//   - cuBLAS's own workspace is never used: cublasSetStream resets the handle to the default
//     workspace pool, which grows by a new allocation per capture, so every session binds a
//     caller-provided workspace (part of the op's workspace, from torch's allocator) after binding
//     the stream. Its size is kCublasWorkspaceBytes.
#pragma once

#include <cublas_v2.h>  // types and enums only: nothing here links against libcublas
#include <cuda_runtime.h>

#include <mutex>

#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda {

// The cudaDataType of a flashdelta float dtype (bf16 / fp16 / fp32).
cudaDataType cublas_data_type(DType dtype);

// A column-major matrix operand: pointer, element type, leading dimension (elements).
struct BlasMatrix {
  const void* data;
  cudaDataType type;
  int64_t ld;
};

// Bytes of the workspace a CublasSession binds: cuBLAS's recommendation for Hopper (32 MiB; 4 MiB
// suffices before it). 256-byte alignment is enough.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

class CublasSession {
 public:
  // Locks the device's handle and binds it to `stream` and to `workspace` (kCublasWorkspaceBytes
  // of device memory, 256-byte aligned, used only by this session's GEMMs on `stream`). The
  // device must be current.
  CublasSession(int device, cudaStream_t stream, void* workspace);
  ~CublasSession();
  CublasSession(const CublasSession&) = delete;
  CublasSession& operator=(const CublasSession&) = delete;

  // Column-major C[m, n] = alpha * op(A) op(B) + beta * C, fp32 accumulation (CUBLAS_COMPUTE_32F:
  // no TF32 for fp32 operands, as torch's default). `what` names the product in errors.
  void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
            const BlasMatrix& a, const BlasMatrix& b, float beta, void* c, cudaDataType c_type,
            int64_t ldc, const char* what);

 private:
  cublasHandle_t handle_ = nullptr;
  std::unique_lock<std::mutex> lock_;
};

}  // namespace flashdelta::detail::cuda
