// Validation and backend choice for chunk_gated_delta_rule and fused_recurrent_gated_delta_rule.
#include "flashdelta/chunk_gated_delta_rule.h"
#include "flashdelta/fused_recurrent_gated_delta_rule.h"
#include "gated_delta_rule_backend.h"
#include "gated_delta_rule_checks.h"

namespace flashdelta {
namespace detail {
namespace {

const char* op_name(GatedDeltaRuleKind kind) {
  return kind == GatedDeltaRuleKind::kChunk ? "chunk_gated_delta_rule"
                                            : "fused_recurrent_gated_delta_rule";
}

const GatedDeltaRuleBackend& backend_for(GatedDeltaRuleKind kind, const Device& device) {
  const GatedDeltaRuleBackend* backend = device.type == DeviceType::kCPU
                                             ? cpu::gated_delta_rule_backend(kind)
                                             : cuda::gated_delta_rule_backend(kind);
  if (backend == nullptr) {
    fail(Error::Kind::kNotImplemented, op_name(kind), ": this build of flashdelta has no ",
         device_name(device), " kernel for this op",
         device.type == DeviceType::kCUDA && !build_info().cuda
             ? " (it was built without CUDA: set FLASHDELTA_WITH_CUDA=1 and a CUDA toolkit)"
             : "");
  }
  return *backend;
}

// A backend may have a forward without a backward (yet): say so precisely.
void require_direction(const GatedDeltaRuleBackend& b, GatedDeltaRuleKind kind,
                       const Device& device, bool backward) {
  if (backward ? b.backward == nullptr : b.forward == nullptr) {
    fail(Error::Kind::kNotImplemented, op_name(kind), ": this build of flashdelta has no ",
         device_name(device), backward ? " backward" : " forward", " kernel for this op");
  }
}

size_t saved_bytes(const GatedDeltaRuleBackend& b, const GatedDeltaRuleShape& shape,
                   const GatedDeltaRuleInputs& in) {
  return b.saved_bytes != nullptr ? b.saved_bytes(shape, in) : 0;
}

// A direction's workspace, smaller where what the forward keeps lives in `saved` (with_saved:
// the forward writes it / the backward is given it) and the backend sizes that case.
size_t workspace(const GatedDeltaRuleBackend& b, const GatedDeltaRuleShape& shape,
                 const GatedDeltaRuleInputs& in, bool backward, bool with_saved) {
  const auto bytes = backward ? b.backward_workspace_bytes : b.forward_workspace_bytes;
  const auto bytes_with_saved = backward ? b.backward_workspace_bytes_with_saved
                                         : b.forward_workspace_bytes_with_saved;
  return with_saved && bytes_with_saved != nullptr && saved_bytes(b, shape, in) > 0
             ? bytes_with_saved(shape, in)
             : bytes(shape, in);
}

}  // namespace

size_t gated_delta_rule_workspace_bytes(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                                        bool backward, bool with_saved) {
  const GatedDeltaRuleShape shape = check_gated_delta_rule_inputs(in);
  const GatedDeltaRuleBackend& b = backend_for(kind, in.q.device);
  require_direction(b, kind, in.q.device, backward);
  return workspace(b, shape, in, backward, with_saved);
}

size_t gated_delta_rule_saved_bytes(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in) {
  const GatedDeltaRuleShape shape = check_gated_delta_rule_inputs(in);
  const GatedDeltaRuleBackend& b = backend_for(kind, in.q.device);
  require_direction(b, kind, in.q.device, false);
  return saved_bytes(b, shape, in);
}

void gated_delta_rule_forward(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                              const GatedDeltaRuleForwardOutputs& out) {
  const GatedDeltaRuleShape shape = check_gated_delta_rule_inputs(in);
  const GatedDeltaRuleBackend& b = backend_for(kind, in.q.device);
  require_direction(b, kind, in.q.device, false);
  const size_t saved = saved_bytes(b, shape, in);
  check_forward_outputs(shape, in, out, workspace(b, shape, in, false, out.saved.defined()),
                        saved, op_name(kind));
  if (saved == 0 && out.saved.defined()) {  // nothing to keep: the backend ignores it
    GatedDeltaRuleForwardOutputs without = out;
    without.saved = TensorRef{};
    b.forward(shape, in, without);
    return;
  }
  b.forward(shape, in, out);
}

void gated_delta_rule_backward(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                               const GatedDeltaRuleBackwardInputs& gin,
                               const GatedDeltaRuleBackwardOutputs& gout) {
  const GatedDeltaRuleShape shape = check_gated_delta_rule_inputs(in);
  const GatedDeltaRuleBackend& b = backend_for(kind, in.q.device);
  require_direction(b, kind, in.q.device, true);
  const size_t saved = saved_bytes(b, shape, in);
  check_backward_args(shape, in, gin, gout,
                      workspace(b, shape, in, true, gin.saved.defined()), saved,
                      op_name(kind));
  if (saved == 0 && gin.saved.defined()) {  // nothing was kept: the backend recomputes
    GatedDeltaRuleBackwardInputs without = gin;
    without.saved = TensorRef{};
    b.backward(shape, in, without, gout);
    return;
  }
  b.backward(shape, in, gin, gout);
}

}  // namespace detail

using detail::GatedDeltaRuleKind;

size_t chunk_gated_delta_rule_forward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                      bool with_saved) {
  return detail::gated_delta_rule_workspace_bytes(GatedDeltaRuleKind::kChunk, in, false,
                                                  with_saved);
}
size_t chunk_gated_delta_rule_backward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                       bool with_saved) {
  return detail::gated_delta_rule_workspace_bytes(GatedDeltaRuleKind::kChunk, in, true,
                                                  with_saved);
}
size_t chunk_gated_delta_rule_saved_bytes(const GatedDeltaRuleInputs& in) {
  return detail::gated_delta_rule_saved_bytes(GatedDeltaRuleKind::kChunk, in);
}
void chunk_gated_delta_rule_forward(const GatedDeltaRuleInputs& in,
                                    const GatedDeltaRuleForwardOutputs& out) {
  detail::gated_delta_rule_forward(GatedDeltaRuleKind::kChunk, in, out);
}
void chunk_gated_delta_rule_backward(const GatedDeltaRuleInputs& in,
                                     const GatedDeltaRuleBackwardInputs& gin,
                                     const GatedDeltaRuleBackwardOutputs& gout) {
  detail::gated_delta_rule_backward(GatedDeltaRuleKind::kChunk, in, gin, gout);
}

size_t fused_recurrent_gated_delta_rule_forward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                                bool with_saved) {
  return detail::gated_delta_rule_workspace_bytes(GatedDeltaRuleKind::kFusedRecurrent, in, false,
                                                  with_saved);
}
size_t fused_recurrent_gated_delta_rule_backward_workspace_bytes(const GatedDeltaRuleInputs& in,
                                                                 bool with_saved) {
  return detail::gated_delta_rule_workspace_bytes(GatedDeltaRuleKind::kFusedRecurrent, in, true,
                                                  with_saved);
}
size_t fused_recurrent_gated_delta_rule_saved_bytes(const GatedDeltaRuleInputs& in) {
  return detail::gated_delta_rule_saved_bytes(GatedDeltaRuleKind::kFusedRecurrent, in);
}
void fused_recurrent_gated_delta_rule_forward(const GatedDeltaRuleInputs& in,
                                              const GatedDeltaRuleForwardOutputs& out) {
  detail::gated_delta_rule_forward(GatedDeltaRuleKind::kFusedRecurrent, in, out);
}
void fused_recurrent_gated_delta_rule_backward(const GatedDeltaRuleInputs& in,
                                               const GatedDeltaRuleBackwardInputs& gin,
                                               const GatedDeltaRuleBackwardOutputs& gout) {
  detail::gated_delta_rule_backward(GatedDeltaRuleKind::kFusedRecurrent, in, gin, gout);
}

}  // namespace flashdelta
