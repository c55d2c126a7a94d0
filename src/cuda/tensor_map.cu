// encode_tensor_map_2byte (tensor_map.cuh): cuTensorMapEncodeTiled, found once through the
// runtime's driver entry-point query.
#include "cuda/tensor_map.cuh"

#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

namespace flashdelta::detail::cuda {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled_entry_point() {
  // Thread-safe one-time lookup; nullptr when the driver is too old or absent.
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // leave no sticky error for the next launch check
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace

bool encode_tensor_map_2byte(CUtensorMap* map, DType dtype, const void* base, int rank,
                             const uint64_t* dims, const uint64_t* strides_bytes,
                             const uint32_t* box, int swizzle_bytes) {
  if (rank < 2 || rank > 5) return false;
  if (swizzle_bytes != 128 && swizzle_bytes != 64) return false;
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  const auto encode = encode_tiled_entry_point();
  if (encode == nullptr) return false;
  cuuint64_t global_dims[5];
  cuuint64_t global_strides[4];
  cuuint32_t box_dims[5];
  cuuint32_t element_strides[5];
  for (int i = 0; i < rank; ++i) {
    if (dims[i] == 0) return false;
    global_dims[i] = dims[i];
    box_dims[i] = box[i];
    element_strides[i] = 1;
    if (i + 1 < rank) global_strides[i] = strides_bytes[i];
  }
  const CUresult r = encode(
      map,
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      static_cast<cuuint32_t>(rank), const_cast<void*>(base), global_dims, global_strides,
      box_dims, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace flashdelta::detail::cuda
