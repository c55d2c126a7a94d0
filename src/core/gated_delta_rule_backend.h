// How the two gated delta rule ops reach a backend: each backend (src/cpu, src/cuda) fills one
// table per op; the public entry points validate, pick the table for the inputs' device and call.
#pragma once

#include <cstddef>

#include "flashdelta/gated_delta_rule.h"

namespace flashdelta::detail {

struct GatedDeltaRuleBackend {
  size_t (*forward_workspace_bytes)(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&);
  size_t (*backward_workspace_bytes)(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&);
  void (*forward)(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&,
                  const GatedDeltaRuleForwardOutputs&);
  void (*backward)(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&,
                   const GatedDeltaRuleBackwardInputs&, const GatedDeltaRuleBackwardOutputs&);
  // Optional (nullptr: the forward keeps nothing for the backward): the bytes of the forward's
  // `saved`, and the backward's workspace when it is given them.
  size_t (*saved_bytes)(const GatedDeltaRuleShape&, const GatedDeltaRuleInputs&) = nullptr;
  size_t (*backward_workspace_bytes_with_saved)(const GatedDeltaRuleShape&,
                                                const GatedDeltaRuleInputs&) = nullptr;
  // Optional (nullptr: forward_workspace_bytes): the forward's workspace when it writes `saved`.
  size_t (*forward_workspace_bytes_with_saved)(const GatedDeltaRuleShape&,
                                               const GatedDeltaRuleInputs&) = nullptr;
};

enum class GatedDeltaRuleKind { kChunk, kFusedRecurrent };

// Defined by each backend; nullptr when that backend has no kernel for the op. Within a table,
// backward (and backward_workspace_bytes) may be nullptr when only the forward exists.
namespace cpu {
const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind kind);
}
namespace cuda {
const GatedDeltaRuleBackend* gated_delta_rule_backend(GatedDeltaRuleKind kind);
}

// Entry points shared by both ops (src/core/gated_delta_rule_dispatch.cpp).
size_t gated_delta_rule_workspace_bytes(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                                        bool backward, bool with_saved = false);
size_t gated_delta_rule_saved_bytes(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in);
void gated_delta_rule_forward(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                              const GatedDeltaRuleForwardOutputs& out);
void gated_delta_rule_backward(GatedDeltaRuleKind kind, const GatedDeltaRuleInputs& in,
                               const GatedDeltaRuleBackwardInputs& gin,
                               const GatedDeltaRuleBackwardOutputs& gout);

}  // namespace flashdelta::detail
