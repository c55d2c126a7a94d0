// Chunked gated delta rule on CUDA: the host side. Fills ChunkParams from the validated inputs,
// carves the workspace and launches the phases (common.cuh; the backward's are listed above
// backward() below) on the caller's stream. Nothing here reads device memory: varlen offsets stay
// on the device, so the op is graph-capturable.
#include "core/check.h"
#include "cuda/chunk_gated_delta_rule/kernels.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using chunk::bf16;
using chunk::ChunkParams;
using chunk::kC;
using chunk::kD;

int64_t num_slots(const GatedDeltaRuleShape& s) {
  if (s.varlen) return s.seq_len / kC + s.num_seqs;
  return s.batch * ((s.seq_len + kC - 1) / kC);
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// Byte sizes of the tensors between the phases (Workspace's, then the backward's own). A training
// forward keeps in `saved` everything the backward reads and would recompute (kept(): the states
// entering each chunk, W, U, M, gamma, T, beta, and the key heads' K and Q with their rows'
// inverse norms); its backward's workspace is then dstates alone, and the forward needs none.
// Without `saved` each direction's workspace holds all it uses (the forward: no T, beta, norms or
// states).
struct WorkspaceLayout {
  size_t w, u, kn, qn, m, gamma, t, beta, key_inv, states, dstates;

  size_t kept() const { return states + w + u + m + gamma + t + beta + kn + qn + 2 * key_inv; }
  size_t forward() const { return w + u + m + gamma + kn + qn; }
  size_t backward() const { return kept() + dstates; }
  size_t backward_with_saved() const { return dstates; }
};

WorkspaceLayout layout(const GatedDeltaRuleShape& s) {
  const size_t blocks = static_cast<size_t>(num_slots(s)) * s.num_v_heads;
  const size_t key_tile = align_up(static_cast<size_t>(num_slots(s)) * s.num_heads * kC * kD *
                                   sizeof(bf16));
  const size_t chunk_tile = align_up(blocks * kC * kD * sizeof(bf16));
  const size_t chunk_square = align_up(blocks * kC * kC * sizeof(bf16));
  const size_t state = align_up(blocks * kD * kD * sizeof(bf16));
  const size_t chunk_row = align_up(blocks * kC * sizeof(float));
  const size_t key_row = align_up(static_cast<size_t>(num_slots(s)) * s.num_heads * kC *
                                  sizeof(float));
  return {chunk_tile, chunk_tile, key_tile, key_tile, chunk_square, chunk_row, chunk_square,
          chunk_row, key_row, state, state};
}

void check_supported(const GatedDeltaRuleShape& s) {
  const char* op = "chunk_gated_delta_rule";
  if (s.head_k_dim > kD || s.head_v_dim > kD)
    fail(Error::Kind::kNotImplemented, op,
                        ": the CUDA kernels support head dimensions up to 128, got K = ",
         s.head_k_dim, ", V = ", s.head_v_dim);
  check_value(s.num_v_heads <= 65535, op, ": the CUDA kernels support up to 65535 value heads");
}

size_t forward_workspace_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs&) {
  check_supported(s);
  return layout(s).forward();
}

size_t backward_workspace_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs&) {
  check_supported(s);
  return layout(s).backward();
}

// A training forward keeps the states entering every chunk (bf16, the backward's layout) and
// phase 1's products with T; the backward given them skips its replay and phase 1.
size_t saved_bytes(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs&) {
  check_supported(s);
  return layout(s).kept();
}

size_t forward_workspace_bytes_with_saved(const GatedDeltaRuleShape& s,
                                          const GatedDeltaRuleInputs&) {
  check_supported(s);
  return 0;
}

size_t backward_workspace_bytes_with_saved(const GatedDeltaRuleShape& s,
                                           const GatedDeltaRuleInputs&) {
  check_supported(s);
  return layout(s).backward_with_saved();
}

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

// `saved`: what a training forward keeps (WorkspaceLayout::kept), written by the forward and read
// by the backward; the workspace then holds only the rest.
ChunkParams make_params(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                        void* workspace, bool backward, void* saved = nullptr) {
  ChunkParams p{};
  p.q = in.q.data, p.k = in.k.data, p.v = in.v.data, p.g = in.g.data, p.beta = in.beta.data;
  p.dtype = in.q.dtype, p.g_dtype = in.g.dtype, p.beta_dtype = in.beta.dtype;
  copy_strides(in.q, p.q_s), copy_strides(in.k, p.k_s), copy_strides(in.v, p.v_s);
  copy_strides(in.g, p.g_s), copy_strides(in.beta, p.beta_s);
  p.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data : nullptr;
  p.cu_seqlens_64 = in.cu_seqlens.defined() && in.cu_seqlens.dtype == DType::kInt64;
  p.seq_len = s.seq_len;
  p.num_slots = num_slots(s);
  p.num_seqs = static_cast<int>(s.num_seqs);
  p.num_heads = static_cast<int>(s.num_heads);
  p.num_v_heads = static_cast<int>(s.num_v_heads);
  p.group = static_cast<int>(s.num_v_heads / s.num_heads);
  p.head_k_dim = static_cast<int>(s.head_k_dim);
  p.head_v_dim = static_cast<int>(s.head_v_dim);
  p.scale = static_cast<float>(s.scale);
  p.l2norm = in.use_qk_l2norm;

  const WorkspaceLayout l = layout(s);
  // Carves consecutive tensors out of one buffer.
  struct Carver {
    unsigned char* next;
    void* take(size_t bytes) {
      void* ptr = next;
      next += bytes;
      return ptr;
    }
  };
  Carver ws{static_cast<unsigned char*>(workspace)};
  Carver kept{static_cast<unsigned char*>(saved)};
  Carver& k = saved != nullptr ? kept : ws;  // where the kept tensors go
  bf16* states = nullptr;
  if (saved != nullptr || backward) states = static_cast<bf16*>(k.take(l.states));
  p.ws.w = static_cast<bf16*>(k.take(l.w));
  p.ws.u = static_cast<bf16*>(k.take(l.u));
  p.ws.m = static_cast<bf16*>(k.take(l.m));
  p.ws.gamma = static_cast<float*>(k.take(l.gamma));
  if (saved != nullptr || backward) {
    p.ws.t = static_cast<bf16*>(k.take(l.t));
    p.ws.beta = static_cast<float*>(k.take(l.beta));
    p.ws.k_inv = static_cast<float*>(k.take(l.key_inv));
    p.ws.q_inv = static_cast<float*>(k.take(l.key_inv));
  }
  p.ws.kn = static_cast<bf16*>(k.take(l.kn));
  p.ws.qn = static_cast<bf16*>(k.take(l.qn));
  if (backward) {
    p.bwd.states = states;
    p.bwd.dstates = static_cast<bf16*>(ws.take(l.dstates));
  } else {
    p.saved_states = states;
  }
  return p;
}

void forward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
             const GatedDeltaRuleForwardOutputs& out) {
  check_supported(s);
  check_value(s.num_seqs <= 0x7fffffff, "chunk_gated_delta_rule: too many sequences");
  if (s.num_seqs == 0) return;
  ChunkParams p = make_params(s, in, out.workspace.data, false,
                              out.saved.defined() ? out.saved.data : nullptr);
  p.initial_state = in.initial_state.defined() ? static_cast<const float*>(in.initial_state.data)
                                               : nullptr;
  p.final_state = out.final_state.defined() ? static_cast<float*>(out.final_state.data) : nullptr;
  p.o = out.o.data;
  if (in.initial_state.defined()) copy_strides(in.initial_state, p.h0_s);
  if (out.final_state.defined()) copy_strides(out.final_state, p.ht_s);
  copy_strides(out.o, p.o_s);

  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  chunk::check_state_switches();  // before any launch
  // Empty sequences have no slots; the state pass still copies initial to final states.
  if (p.num_slots > 0) chunk::launch_intra(p, stream);
  chunk::launch_state(p, stream);
}

// The backward, four launches on the caller's stream (the CPU kernel's derivation, split by what
// parallelises):
//   intra   (slot, value head)                  the forward's W, U, K, Q, M, gamma, and T and beta
//   state   (sequence, value head, V tile)      replays the recurrence; stores S^T entering each
//                                               chunk (bf16: the forward's bits), writes no output
//   (both skipped when the forward kept what they write: grad_in.saved)
//   dstate  (sequence, value head, V tile)      chunks in reverse, dS in registers (k and the
//                                               tokens split in halves or quarters over the
//                                               warps of a row group); stores dS'^T leaving
//                                               each chunk, writes d_initial_state
//   grads   (slot, key head)                    every gradient of one chunk given S and dS', the
//                                               key head's value heads in turn: dv, dg, dbeta per
//                                               value head; dq, dk summed in registers, through
//                                               the l2norm backward
// Where the time should go (1 x 32768, HV = 32, per chunk and head): intra ~2 M multiply-adds,
// state (replay, per 64-column tile) ~1 M and 40 KB read + 16 KB of state written, dstate (per
// tile) ~1.6 M and 48 KB read + 16 KB written, grads ~11.5 M and ~130 KB read per value head.
// The states (2 x 32 KB per chunk and head in bf16) dominate the workspace: storing them for
// every other chunk is the next saving. A training forward keeps the states and phase 1's
// products (saved_bytes): the backward then runs dstate and grads alone, on the same bits.
void backward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
              const GatedDeltaRuleBackwardInputs& gin, const GatedDeltaRuleBackwardOutputs& gout) {
  check_supported(s);
  check_value(s.num_seqs <= 0x7fffffff, "chunk_gated_delta_rule: too many sequences");
  if (gin.d_o.dtype == DType::kFloat64)
    fail(Error::Kind::kType, "chunk_gated_delta_rule: d_o must be float32, float16 or bfloat16 "
                             "for the CUDA kernels, got float64");
  if (s.num_seqs == 0) return;
  void* const saved = gin.saved.defined() ? gin.saved.data : nullptr;
  ChunkParams p = make_params(s, in, gout.workspace.data, true, saved);
  p.initial_state = in.initial_state.defined() ? static_cast<const float*>(in.initial_state.data)
                                               : nullptr;
  if (in.initial_state.defined()) copy_strides(in.initial_state, p.h0_s);
  p.final_state = nullptr;
  p.o = nullptr;
  chunk::BackwardParams& b = p.bwd;
  b.d_o = gin.d_o.data;
  b.d_o_dtype = gin.d_o.dtype;
  copy_strides(gin.d_o, b.d_o_s);
  if (gin.d_final_state.defined()) {
    b.d_final_state = static_cast<const float*>(gin.d_final_state.data);
    copy_strides(gin.d_final_state, b.dht_s);
  }
  if (gout.d_initial_state.defined()) {
    b.d_initial_state = static_cast<float*>(gout.d_initial_state.data);
    copy_strides(gout.d_initial_state, b.dh0_s);
  }
  b.dq = gout.dq.data, b.dk = gout.dk.data, b.dv = gout.dv.data;
  b.dg = gout.dg.data, b.dbeta = gout.dbeta.data;
  b.dg_dtype = gout.dg.dtype, b.dbeta_dtype = gout.dbeta.dtype;
  copy_strides(gout.dq, b.dq_s), copy_strides(gout.dk, b.dk_s), copy_strides(gout.dv, b.dv_s);
  copy_strides(gout.dg, b.dg_s), copy_strides(gout.dbeta, b.dbeta_s);

  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  chunk::check_grads_device();  // before any launch
  chunk::check_state_switches();
  chunk::check_dstate_switches();
  if (saved == nullptr) {  // else the forward kept the states and phase 1's products
    if (p.num_slots > 0) chunk::launch_intra(p, stream);
    chunk::launch_state(p, stream);
  }
  chunk::launch_dstate(p, stream);  // also d_initial_state of empty sequences
  if (p.num_slots > 0) chunk::launch_grads(p, stream);
}

}  // namespace

const GatedDeltaRuleBackend kChunkGatedDeltaRule = {
    forward_workspace_bytes, backward_workspace_bytes, forward, backward, saved_bytes,
    backward_workspace_bytes_with_saved, forward_workspace_bytes_with_saved};

}  // namespace flashdelta::detail::cuda
