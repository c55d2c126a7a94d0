// moe_experts on CUDA: forward = two grouped GEMMs (moe_grouped_gemm.cuh) over transformers'
// weight layouts, no transposed copies:
//   1. gate_up = x W1_e^T with the SwiGLU in the epilogue (writes gate_up for the backward and
//      act = silu(g) * u, both in the storage dtype),
//   2. out = act W2_e^T,
// then the dropped rows (>= offsets[E]) of out are zeroed. Three launches, no host
// synchronisation, deterministic. The backward is in moe_experts_backward.cu.
#include "core/moe_backend.h"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/moe_experts_cuda.cuh"

namespace flashdelta::detail::cuda {

namespace {

template <typename T>
void experts_forward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                     const MoeExpertsForwardOutputs& out, cudaStream_t stream) {
  using namespace moe;
  const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate;
  const int E = static_cast<int>(s.num_experts);
  const auto* offsets = static_cast<const int32_t*>(in.expert_offsets.data);
  T* gate_up = static_cast<T*>(out.gate_up.data);
  T* act = static_cast<T*>(out.act.data);

  GroupedGemmParams<T> up;
  up.a = static_cast<const T*>(in.hidden.data);
  up.lda = in.hidden.strides[0];
  up.b = static_cast<const T*>(in.gate_up_proj.data);
  up.ldb = in.gate_up_proj.strides[1];
  up.b_expert_stride = in.gate_up_proj.strides[0];
  up.offsets = offsets;
  up.num_experts = E;
  up.num_rows = N;
  up.n_size = I;
  up.k_size = H;
  up.gate_up = gate_up;
  up.ld_gate_up = 2 * I;
  up.act = act;
  up.ld_act = I;
  up.intermediate = I;
  up.vector_ok = vector_friendly(up.a, up.lda) && vector_friendly(up.b, up.ldb, up.b_expert_stride);
  launch_grouped_gemm<T, Grouping::kRows, true, Epilogue::kSwiGLU>(up, stream);

  GroupedGemmParams<T> down;
  down.a = act;
  down.lda = I;
  down.b = static_cast<const T*>(in.down_proj.data);
  down.ldb = in.down_proj.strides[1];
  down.b_expert_stride = in.down_proj.strides[0];
  down.c = static_cast<T*>(out.out.data);
  down.ldc = H;
  down.offsets = offsets;
  down.num_experts = E;
  down.num_rows = N;
  down.n_size = H;
  down.k_size = I;
  down.vector_ok = vector_friendly(down.a, down.lda) &&
                   vector_friendly(down.b, down.ldb, down.b_expert_stride);
  launch_grouped_gemm<T, Grouping::kRows, true, Epilogue::kStore>(down, stream);

  launch_zero_dropped_rows(static_cast<T*>(out.out.data), H, H, offsets, E, N, stream);
}

}  // namespace

void moe_experts_forward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                         const MoeExpertsForwardOutputs& out) {
  DeviceGuard guard(in.hidden.device.index);
  auto stream = static_cast<cudaStream_t>(in.stream);
  if (in.hidden.dtype == DType::kBFloat16) {
    experts_forward<__nv_bfloat16>(s, in, out, stream);
  } else {
    experts_forward<__half>(s, in, out, stream);
  }
}

}  // namespace flashdelta::detail::cuda
