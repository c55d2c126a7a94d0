// The kernels of the chunked gated delta rule on CUDA, one launcher per file of this folder.
#pragma once

#include <cuda_runtime.h>

#include "cuda/chunk_gated_delta_rule/common.cuh"
#include "cuda/cuda_check.cuh"

namespace flashdelta::detail::cuda::chunk {

void launch_intra(const ChunkParams& p, cudaStream_t stream);   // intra.cu
void launch_state(const ChunkParams& p, cudaStream_t stream);   // state.cu
// backward (launch.cu has the picture); launch_intra and launch_state replay the forward first
void launch_dstate(const ChunkParams& p, cudaStream_t stream);  // dstate.cu
void launch_grads(const ChunkParams& p, cudaStream_t stream);   // grads.cu
void check_grads_device();  // grads.cu: raises where the current device lacks its shared memory
void launch_reduce(const ChunkParams& p, cudaStream_t stream);  // reduce.cu

}  // namespace flashdelta::detail::cuda::chunk
