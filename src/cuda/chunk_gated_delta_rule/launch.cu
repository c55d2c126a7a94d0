// Chunked gated delta rule on CUDA: the host side. Fills ChunkParams from the validated inputs,
// carves the workspace and launches the phases (common.cuh) on the caller's stream. Nothing here
// reads device memory: varlen offsets stay on the device, so the op is graph-capturable.
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

// Byte sizes of the workspace tensors (in Workspace's order).
struct WorkspaceLayout {
  size_t w, u, kr, qe, m, gamma;
  size_t total() const { return w + u + kr + qe + m + gamma; }
};

WorkspaceLayout layout(const GatedDeltaRuleShape& s) {
  const size_t blocks = static_cast<size_t>(num_slots(s)) * s.num_v_heads;
  const size_t chunk_tile = align_up(blocks * kC * kD * sizeof(bf16));
  return {chunk_tile, chunk_tile, chunk_tile, chunk_tile,
          align_up(blocks * kC * kC * sizeof(bf16)), align_up(blocks * kC * sizeof(float))};
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
  return layout(s).total();
}

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

ChunkParams make_params(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
                        void* workspace) {
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
  auto* base = static_cast<unsigned char*>(workspace);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    void* ptr = base + off;
    off += bytes;
    return ptr;
  };
  p.ws.w = static_cast<bf16*>(take(l.w));
  p.ws.u = static_cast<bf16*>(take(l.u));
  p.ws.kr = static_cast<bf16*>(take(l.kr));
  p.ws.qe = static_cast<bf16*>(take(l.qe));
  p.ws.m = static_cast<bf16*>(take(l.m));
  p.ws.gamma = static_cast<float*>(take(l.gamma));
  return p;
}

void forward(const GatedDeltaRuleShape& s, const GatedDeltaRuleInputs& in,
             const GatedDeltaRuleForwardOutputs& out) {
  check_supported(s);
  check_value(s.num_seqs <= 0x7fffffff, "chunk_gated_delta_rule: too many sequences");
  if (s.num_seqs == 0) return;
  ChunkParams p = make_params(s, in, out.workspace.data);
  p.initial_state = in.initial_state.defined() ? static_cast<const float*>(in.initial_state.data)
                                               : nullptr;
  p.final_state = out.final_state.defined() ? static_cast<float*>(out.final_state.data) : nullptr;
  p.o = out.o.data;
  if (in.initial_state.defined()) copy_strides(in.initial_state, p.h0_s);
  if (out.final_state.defined()) copy_strides(out.final_state, p.ht_s);
  copy_strides(out.o, p.o_s);

  const DeviceGuard guard(in.q.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  // Empty sequences have no slots; the state pass still copies initial to final states.
  if (p.num_slots > 0) chunk::launch_intra(p, stream);
  chunk::launch_state(p, stream);
}

}  // namespace

const GatedDeltaRuleBackend kChunkGatedDeltaRule = {forward_workspace_bytes, nullptr, forward,
                                                     /*backward=*/nullptr};

}  // namespace flashdelta::detail::cuda
