// flashdelta: arguments shared by the two gated delta rule ops
// (chunk_gated_delta_rule.h and fused_recurrent_gated_delta_rule.h).
//
// Per value head h (key/query head h / (HV / H)), per sequence:
//   S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
// with S of shape [K, V] in fp32 and, when use_qk_l2norm is set, q and k replaced by
// x / sqrt(sum(x^2) + 1e-6) first.
#pragma once

#include "flashdelta/tensor.h"

namespace flashdelta {

struct GatedDeltaRuleInputs {
  TensorRef q;              // [B, T, H, K]   f32 | f16 | bf16 (| f64 on CPU)
  TensorRef k;              // [B, T, H, K]   same dtype as q
  TensorRef v;              // [B, T, HV, V]  same dtype as q, HV a multiple of H
  TensorRef g;              // [B, T, HV]     log decay (<= 0), any float dtype
  TensorRef beta;           // [B, T, HV]     in (0, 1), any float dtype
  TensorRef initial_state;  // optional [N, HV, K, V] f32 (f64 when q is f64)
  TensorRef cu_seqlens;     // optional [N + 1] int32 | int64; then B == 1
  double scale = 0.0;       // <= 0 means K^-0.5
  bool use_qk_l2norm = false;
  void* stream = nullptr;   // cudaStream_t for CUDA tensors; ignored on CPU
};

struct GatedDeltaRuleForwardOutputs {
  TensorRef o;            // [B, T, HV, V] q's dtype
  TensorRef final_state;  // optional [N, HV, K, V] initial_state's dtype (f32, f64 for f64 q)
  TensorRef workspace;    // uint8 [workspace bytes] on the inputs' device
  // Optional, for training: uint8 [saved bytes] (the op's *_saved_bytes; 0 where the op keeps
  // nothing on that device, and then `saved` is ignored). The forward writes into it what the
  // backward would otherwise recompute; hand it to the backward of the same inputs.
  TensorRef saved;
};

struct GatedDeltaRuleBackwardInputs {
  TensorRef d_o;            // [B, T, HV, V] q's dtype (any strides)
  TensorRef d_final_state;  // optional [N, HV, K, V]
  TensorRef saved;          // optional: the forward's `saved` for these same inputs
};

struct GatedDeltaRuleBackwardOutputs {
  TensorRef dq, dk, dv, dg, dbeta;  // shapes and dtypes of q, k, v, g, beta
  TensorRef d_initial_state;        // required iff initial_state is given
  TensorRef workspace;              // uint8 [workspace bytes]
};

// The problem sizes, after validation.
struct GatedDeltaRuleShape {
  int64_t batch = 0;       // B
  int64_t seq_len = 0;     // T
  int64_t num_heads = 0;   // H (query/key heads)
  int64_t num_v_heads = 0; // HV
  int64_t head_k_dim = 0;  // K
  int64_t head_v_dim = 0;  // V
  int64_t num_seqs = 0;    // N: B, or len(cu_seqlens) - 1
  bool varlen = false;
  double scale = 0.0;      // resolved
};

// Validates the inputs (ranks, sizes, dtypes, devices) and returns the sizes. Throws Error
// naming the argument, with what was expected and what was given.
GatedDeltaRuleShape check_gated_delta_rule_inputs(const GatedDeltaRuleInputs& in);

}  // namespace flashdelta
