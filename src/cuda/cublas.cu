// cuBLAS loaded at run time (see cublas.cuh for why and how).
#include "cuda/cublas.cuh"

#include <dlfcn.h>

#include <array>
#include <climits>
#include <string>
#include <type_traits>

#include "core/check.h"
#include "cuda/cuda_check.cuh"

namespace flashdelta::detail::cuda {
namespace {

// cublasGemmEx's C signature (the C++ headers overload the name, so decltype cannot name it).
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);

// The entry points flashdelta uses, as the headers declare them.
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  GemmExFn gemm_ex = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
  std::string error;  // why loading failed (empty when loaded)
};

const std::string& library_name() {
  static const std::string name = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  return name;
}

CublasApi load_cublas() {
  CublasApi api;
  // Prefer the copy already in the process (torch's), else load it.
  void* lib = dlopen(library_name().c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen(library_name().c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    api.error = library_name() + " could not be loaded (" + (why ? why : "unknown reason") +
                "); flashdelta's CUDA GEMMs need cuBLAS " + std::to_string(CUBLAS_VER_MAJOR) +
                " (installed with torch's CUDA wheels as nvidia-cublas)";
    return api;
  }
  auto resolve = [&](auto& fn, const char* symbol) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
    if (fn == nullptr && api.error.empty()) {
      api.error = library_name() + " has no symbol " + symbol;
    }
  };
  resolve(api.create, "cublasCreate_v2");
  resolve(api.set_stream, "cublasSetStream_v2");
  resolve(api.set_workspace, "cublasSetWorkspace_v2");
  resolve(api.gemm_ex, "cublasGemmEx");
  resolve(api.status_string, "cublasGetStatusString");
  return api;
}

const CublasApi& cublas_api() {
  static const CublasApi api = load_cublas();  // thread-safe one-time initialisation
  if (!api.error.empty()) fail(Error::Kind::kRuntime, api.error);
  return api;
}

constexpr int kMaxDevices = 64;

struct HandleSlot {
  std::mutex mutex;
  cublasHandle_t handle = nullptr;  // never destroyed: lives as long as the process
};

std::array<HandleSlot, kMaxDevices>& handle_slots() {
  static std::array<HandleSlot, kMaxDevices> slots;
  return slots;
}

void check_status(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail(Error::Kind::kRuntime, "cuBLAS failed in ", what, ": ",
       cublas_api().status_string(status), " (status ", static_cast<int>(status), ")");
}

int as_int(int64_t value, const char* what) {
  if (value < 0 || value > INT_MAX) {
    fail(Error::Kind::kValue, "cuBLAS GEMM ", what, ": dimension ", value,
         " does not fit cuBLAS's 32-bit sizes");
  }
  return static_cast<int>(value);
}

}  // namespace

cudaDataType cublas_data_type(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return CUDA_R_16BF;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kFloat32: return CUDA_R_32F;
    default:
      fail(Error::Kind::kType, "cuBLAS GEMM: unsupported dtype ", dtype_name(dtype));
  }
}

namespace {

// cublasCreate with this thread's stream-capture mode relaxed: it may allocate device memory,
// which a capture in global mode (torch.cuda.graph's default) would otherwise turn into an error
// and an invalidated capture. Relaxed mode only lifts that prohibition for this thread; the allocation is
// not a stream operation and is not recorded in any graph.
cublasHandle_t create_handle(const CublasApi& api) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  FLASHDELTA_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  cublasHandle_t handle = nullptr;
  const cublasStatus_t status = api.create(&handle);
  FLASHDELTA_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));  // restores the caller's
  check_status(status, "cublasCreate");
  return handle;
}

}  // namespace

CublasSession::CublasSession(int device, cudaStream_t stream, void* workspace) {
  const CublasApi& api = cublas_api();
  if (device < 0 || device >= kMaxDevices) {
    fail(Error::Kind::kValue, "cuBLAS: device index ", device, " out of range");
  }
  if (workspace == nullptr) fail(Error::Kind::kValue, "cuBLAS: no workspace given");
  HandleSlot& slot = handle_slots()[device];
  lock_ = std::unique_lock<std::mutex>(slot.mutex);
  if (slot.handle == nullptr) slot.handle = create_handle(api);
  handle_ = slot.handle;
  // In this order: cublasSetStream resets the workspace to cuBLAS's default pool.
  check_status(api.set_stream(handle_, stream), "cublasSetStream");
  check_status(api.set_workspace(handle_, workspace, kCublasWorkspaceBytes), "cublasSetWorkspace");
}

CublasSession::~CublasSession() = default;

void CublasSession::gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                         float alpha, const BlasMatrix& a, const BlasMatrix& b, float beta,
                         void* c, cudaDataType c_type, int64_t ldc, const char* what) {
  if (m == 0 || n == 0) return;
  const cublasStatus_t status = cublas_api().gemm_ex(
      handle_, transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      as_int(m, what), as_int(n, what), as_int(k, what), &alpha, a.data, a.type,
      as_int(a.ld, what), b.data, b.type, as_int(b.ld, what), &beta, c, c_type,
      as_int(ldc, what), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  check_status(status, what);
}

}  // namespace flashdelta::detail::cuda
