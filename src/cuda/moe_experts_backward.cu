// moe_experts backward on CUDA: four grouped GEMMs (moe_grouped_gemm.cuh) over transformers'
// weight layouts, each weight read as stored (ldmatrix.trans where it is used untransposed):
//   1. d_act = d_out W2_e, with the SwiGLU backward in the epilogue: reads gate_up, writes
//      d_gate_up = [d_g, d_u] (and act = silu(g) * u when weight gradients are wanted),
//   2. d_hidden = d_gate_up W1_e,
//   3. d_down_proj[e]    = d_out_e^T act_e        (weight gradients only: reduction over the
//   4. d_gate_up_proj[e] = d_gate_up_e^T hidden_e  expert's rows, one block per output tile)
// then the dropped rows of d_hidden are zeroed. No atomics, no host synchronisation.
#include "core/moe_backend.h"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/moe_experts_cuda.cuh"

namespace flashdelta::detail::cuda {

namespace {

template <typename T>
void experts_backward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                      const MoeExpertsBackwardArgs& a, cudaStream_t stream) {
  using namespace moe;
  const int64_t N = s.num_rows, H = s.hidden, I = s.intermediate;
  const int E = static_cast<int>(s.num_experts);
  const auto* offsets = static_cast<const int32_t*>(in.expert_offsets.data);
  const bool weight_grads = a.d_gate_up_proj.defined() || a.d_down_proj.defined();
  const T* d_out = static_cast<const T*>(a.d_out.data);
  T* d_gate_up = static_cast<T*>(a.d_gate_up.data);
  T* act = static_cast<T*>(a.act.data);

  GroupedGemmParams<T> d_act;
  d_act.a = d_out;
  d_act.lda = a.d_out.strides[0];
  d_act.b = static_cast<const T*>(in.down_proj.data);
  d_act.ldb = in.down_proj.strides[1];
  d_act.b_expert_stride = in.down_proj.strides[0];
  d_act.offsets = offsets;
  d_act.num_experts = E;
  d_act.num_rows = N;
  d_act.n_size = I;
  d_act.k_size = H;
  d_act.gate_up = static_cast<T*>(a.gate_up.data);
  d_act.ld_gate_up = 2 * I;
  d_act.d_gate_up = d_gate_up;
  d_act.act = weight_grads ? act : nullptr;
  d_act.ld_act = I;
  d_act.intermediate = I;
  d_act.vector_ok = vector_friendly(d_act.a, d_act.lda) &&
                    vector_friendly(d_act.b, d_act.ldb, d_act.b_expert_stride);
  launch_grouped_gemm<T, Grouping::kRows, false, Epilogue::kSwiGLUBackward>(d_act, stream);

  GroupedGemmParams<T> d_x;
  d_x.a = d_gate_up;
  d_x.lda = 2 * I;
  d_x.b = static_cast<const T*>(in.gate_up_proj.data);
  d_x.ldb = in.gate_up_proj.strides[1];
  d_x.b_expert_stride = in.gate_up_proj.strides[0];
  d_x.c = static_cast<T*>(a.d_hidden.data);
  d_x.ldc = H;
  d_x.offsets = offsets;
  d_x.num_experts = E;
  d_x.num_rows = N;
  d_x.n_size = H;
  d_x.k_size = 2 * I;
  d_x.vector_ok = vector_friendly(d_x.a, d_x.lda) &&
                  vector_friendly(d_x.b, d_x.ldb, d_x.b_expert_stride);
  launch_grouped_gemm<T, Grouping::kRows, false, Epilogue::kStore>(d_x, stream);
  launch_zero_dropped_rows(static_cast<T*>(a.d_hidden.data), H, H, offsets, E, N, stream);

  if (a.d_down_proj.defined()) {
    GroupedGemmParams<T> dw2;  // [H, I] per expert: m = h (d_out columns), n = i (act columns)
    dw2.a = d_out;
    dw2.lda = a.d_out.strides[0];
    dw2.b = act;
    dw2.ldb = I;
    dw2.c = static_cast<T*>(a.d_down_proj.data);
    dw2.ldc = I;
    dw2.c_expert_stride = H * I;
    dw2.offsets = offsets;
    dw2.num_experts = E;
    dw2.num_rows = N;
    dw2.m_size = H;
    dw2.n_size = I;
    dw2.vector_ok = vector_friendly(dw2.a, dw2.lda) && vector_friendly(dw2.b, dw2.ldb);
    launch_grouped_gemm<T, Grouping::kReduction, false, Epilogue::kStore>(dw2, stream);
  }
  if (a.d_gate_up_proj.defined()) {
    GroupedGemmParams<T> dw1;  // [2I, H] per expert: m = j (d_gate_up columns), n = h
    dw1.a = d_gate_up;
    dw1.lda = 2 * I;
    dw1.b = static_cast<const T*>(in.hidden.data);
    dw1.ldb = in.hidden.strides[0];
    dw1.c = static_cast<T*>(a.d_gate_up_proj.data);
    dw1.ldc = H;
    dw1.c_expert_stride = 2 * I * H;
    dw1.offsets = offsets;
    dw1.num_experts = E;
    dw1.num_rows = N;
    dw1.m_size = 2 * I;
    dw1.n_size = H;
    dw1.vector_ok = vector_friendly(dw1.a, dw1.lda) && vector_friendly(dw1.b, dw1.ldb);
    launch_grouped_gemm<T, Grouping::kReduction, false, Epilogue::kStore>(dw1, stream);
  }
}

}  // namespace

void moe_experts_backward(const MoeExpertsShape& s, const MoeExpertsInputs& in,
                          const MoeExpertsBackwardArgs& a) {
  DeviceGuard guard(in.hidden.device.index);
  auto stream = static_cast<cudaStream_t>(in.stream);
  if (in.hidden.dtype == DType::kBFloat16) {
    experts_backward<__nv_bfloat16>(s, in, a, stream);
  } else {
    experts_backward<__half>(s, in, a, stream);
  }
}

}  // namespace flashdelta::detail::cuda
