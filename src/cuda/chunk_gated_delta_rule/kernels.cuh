// The kernels of the chunked gated delta rule on CUDA, one launcher per file of this folder.
#pragma once

#include <cuda_runtime.h>

#include "cuda/chunk_gated_delta_rule/common.cuh"
#include "cuda/cuda_check.cuh"

namespace flashdelta::detail::cuda::chunk {

void launch_intra(const ChunkParams& p, cudaStream_t stream);   // intra.cu
void launch_state(const ChunkParams& p, cudaStream_t stream);   // state.cu
// The state pass on wgmma (sm_90a, tiles by TMA); false, launching nothing, where this build or
// device cannot run it. state.cu chooses.
struct ChunkTileMaps;
bool launch_state_wgmma(const ChunkParams& p, const ChunkTileMaps& maps,
                        cudaStream_t stream);  // state_wgmma.cu
// backward (launch.cu has the picture); launch_intra and launch_state replay the forward first
void launch_dstate(const ChunkParams& p, cudaStream_t stream);  // dstate.cu
size_t dstate_smem_bytes();                                      // dstate.cu
void launch_grads(const ChunkParams& p, cudaStream_t stream);   // grads.cu
// The per-value-head dq, dk rows (fp32) reduced over each key head and through the l2norm:
// the fused recurrent backward's last step (the chunked backward sums them in grads.cu).
void launch_reduce(const ChunkParams& p, cudaStream_t stream);  // reduce.cu
// grads.cu: raises where the current device lacks the backward's shared memory (dstate, grads)
void check_grads_device();
// Raise ValueError on a bad FLASHDELTA_GDN_STATE_SHAPE / FLASHDELTA_GDN_DSTATE_SHAPE (the
// launch-shape switches of state.cu and dstate.cu), before any launch.
void check_state_switches();   // state.cu
void check_dstate_switches();  // dstate.cu

}  // namespace flashdelta::detail::cuda::chunk
