// TMA tensor maps (CUtensorMap) for the Hopper kernels, encoded on the host through the driver's
// cuTensorMapEncodeTiled. The driver entry point is looked up once through the CUDA runtime
// (cudaGetDriverEntryPointByVersion), so nothing links against libcuda: the extension still
// imports on a machine without a GPU driver. Encoding is pure host work (no device call, no
// synchronisation): legal while a CUDA graph is being captured; the map travels to the kernel
// by value as a __grid_constant__ parameter.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only: no driver symbol is linked

#include <cstdint>

#include "flashdelta/tensor.h"

namespace flashdelta::detail::cuda {

// A tensor map over a rank-`rank` (2..5) tensor of 2-byte elements (bf16 or fp16, from `dtype`)
// at `base`: dims[0] is the contiguous dimension, strides_bytes[i] the byte stride of dimension
// i + 1; boxes of box[0] x box[1] (x 1 ...) elements, `swizzle_bytes`-byte swizzle (128, or 64
// for boxes of 64-byte rows), zero fill outside the tensor. Returns false when the driver is
// missing or rejects the layout (unaligned base or stride, a stride too large...): the caller
// then takes a path without TMA.
bool encode_tensor_map_2byte(CUtensorMap* map, DType dtype, const void* base, int rank,
                             const uint64_t* dims, const uint64_t* strides_bytes,
                             const uint32_t* box, int swizzle_bytes = 128);

}  // namespace flashdelta::detail::cuda
