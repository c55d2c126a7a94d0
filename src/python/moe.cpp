// Bindings of the mixture-of-experts ops (include/flashdelta/moe_router.h, moe_permute.h,
// moe_experts.h). Arguments mirror the C++ structs' fields, in their order; outputs and scratch
// are allocated by the caller; stream is a cudaStream_t as an integer (ignored on the CPU).
//
//   moe_router_forward(logits, top_k, normalize, weights, indices, stream)
//   moe_router_backward(logits, top_k, normalize, indices, d_weights, d_logits, stream)
//   moe_permute_workspace_bytes(hidden, indices, num_experts) -> int
//   moe_permute(hidden, indices, num_experts, permuted, sorted_pairs, pair_position,
//               expert_offsets, workspace, stream)
//   moe_unpermute_forward(rows, weights, pair_position, out, stream)
//   moe_unpermute_backward(rows, weights, pair_position, d_out, d_rows, d_weights, stream)
//   moe_experts_forward(hidden, expert_offsets, gate_up_proj, down_proj, out, gate_up, act,
//                       stream)
//   moe_experts_backward(hidden, expert_offsets, gate_up_proj, down_proj, d_out, gate_up,
//                        d_hidden, d_gate_up_proj, d_down_proj, d_gate_up, act, stream)
#include "flashdelta/moe_experts.h"
#include "flashdelta/moe_permute.h"
#include "flashdelta/moe_router.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace flashdelta::python {

namespace {
void* as_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }
}  // namespace

void bind_moe_ops(nb::module_& m) {
  using namespace nb::literals;

  m.def(
      "moe_router_forward",
      [](InArray logits, int64_t top_k, bool normalize, OutArray weights, OutArray indices,
         uintptr_t stream) {
        const TensorConverter convert{"moe_router"};
        MoeRouterInputs in{convert(logits, "logits"), top_k, normalize, as_stream(stream)};
        MoeRouterForwardOutputs out{convert(weights, "weights"), convert(indices, "indices")};
        nb::gil_scoped_release release;
        moe_router_forward(in, out);
      },
      "logits"_a, "top_k"_a, "normalize"_a, "weights"_a, "indices"_a, "stream"_a,
      "Router: softmax, top-k, optional renormalisation. Writes weights and indices.");

  m.def(
      "moe_router_backward",
      [](InArray logits, int64_t top_k, bool normalize, InArray indices, InArray d_weights,
         OutArray d_logits, uintptr_t stream) {
        const TensorConverter convert{"moe_router_backward"};
        MoeRouterInputs in{convert(logits, "logits"), top_k, normalize, as_stream(stream)};
        MoeRouterBackwardArgs args{convert(indices, "indices"), convert(d_weights, "d_weights"),
                                   convert(d_logits, "d_logits")};
        nb::gil_scoped_release release;
        moe_router_backward(in, args);
      },
      "logits"_a, "top_k"_a, "normalize"_a, "indices"_a, "d_weights"_a, "d_logits"_a,
      "stream"_a, "Router backward: writes d_logits.");

  m.def(
      "moe_permute_workspace_bytes",
      [](InArray hidden, InArray indices, int64_t num_experts) -> size_t {
        const TensorConverter convert{"moe_permute"};
        MoePermuteArgs a;
        a.hidden = convert(hidden, "hidden");
        a.indices = convert(indices, "indices");
        a.num_experts = num_experts;
        nb::gil_scoped_release release;
        return moe_permute_workspace_bytes(a);
      },
      "hidden"_a, "indices"_a, "num_experts"_a, "Workspace bytes moe_permute needs.");

  m.def(
      "moe_permute",
      [](InArray hidden, InArray indices, int64_t num_experts, OutArray permuted,
         OutArray sorted_pairs, OutArray pair_position, OutArray expert_offsets,
         OptOutArray workspace, uintptr_t stream) {
        const TensorConverter convert{"moe_permute"};
        MoePermuteArgs a;
        a.hidden = convert(hidden, "hidden");
        a.indices = convert(indices, "indices");
        a.num_experts = num_experts;
        a.permuted = convert(permuted, "permuted");
        a.sorted_pairs = convert(sorted_pairs, "sorted_pairs");
        a.pair_position = convert(pair_position, "pair_position");
        a.expert_offsets = convert(expert_offsets, "expert_offsets");
        a.workspace = convert(workspace, "workspace");
        a.stream = as_stream(stream);
        nb::gil_scoped_release release;
        moe_permute(a);
      },
      "hidden"_a, "indices"_a, "num_experts"_a, "permuted"_a, "sorted_pairs"_a,
      "pair_position"_a, "expert_offsets"_a, "workspace"_a.none(), "stream"_a,
      "Counting sort of the (token, slot) pairs by expert, and the row gather.");

  m.def(
      "moe_unpermute_forward",
      [](InArray rows, OptInArray weights, InArray pair_position, OutArray out,
         uintptr_t stream) {
        const TensorConverter convert{"moe_unpermute"};
        MoeUnpermuteArgs a{convert(rows, "rows"), convert(weights, "weights"),
                           convert(pair_position, "pair_position"), convert(out, "out"),
                           as_stream(stream)};
        nb::gil_scoped_release release;
        moe_unpermute_forward(a);
      },
      "rows"_a, "weights"_a.none(), "pair_position"_a, "out"_a, "stream"_a,
      "Weighted combine of the sorted rows back to tokens (weights None: 1).");

  m.def(
      "moe_unpermute_backward",
      [](InArray rows, OptInArray weights, InArray pair_position, InArray d_out,
         OutArray d_rows, OptOutArray d_weights, uintptr_t stream) {
        const TensorConverter convert{"moe_unpermute_backward"};
        MoeUnpermuteArgs a{convert(rows, "rows"), convert(weights, "weights"),
                           convert(pair_position, "pair_position"), TensorRef{},
                           as_stream(stream)};
        MoeUnpermuteBackwardArgs g{convert(d_out, "d_out"), convert(d_rows, "d_rows"),
                                   convert(d_weights, "d_weights")};
        // out only carries T and the dtype: describe it from d_out.
        a.out = g.d_out;
        a.out.strides[0] = a.out.shape[1];
        a.out.strides[1] = 1;
        nb::gil_scoped_release release;
        moe_unpermute_backward(a, g);
      },
      "rows"_a, "weights"_a.none(), "pair_position"_a, "d_out"_a, "d_rows"_a,
      "d_weights"_a.none(), "stream"_a, "Backward of the combine: writes d_rows (and d_weights).");

  m.def(
      "moe_experts_forward",
      [](InArray hidden, InArray expert_offsets, InArray gate_up_proj, InArray down_proj,
         OutArray out, OutArray gate_up, OutArray act, uintptr_t stream) {
        const TensorConverter convert{"moe_experts"};
        MoeExpertsInputs in{convert(hidden, "hidden"), convert(expert_offsets, "expert_offsets"),
                            convert(gate_up_proj, "gate_up_proj"),
                            convert(down_proj, "down_proj"), as_stream(stream)};
        MoeExpertsForwardOutputs o{convert(out, "out"), convert(gate_up, "gate_up"),
                                   convert(act, "act")};
        nb::gil_scoped_release release;
        moe_experts_forward(in, o);
      },
      "hidden"_a, "expert_offsets"_a, "gate_up_proj"_a, "down_proj"_a, "out"_a, "gate_up"_a,
      "act"_a, "stream"_a, "Experts forward (grouped GEMMs, fused SwiGLU).");

  m.def(
      "moe_experts_backward",
      [](InArray hidden, InArray expert_offsets, InArray gate_up_proj, InArray down_proj,
         InArray d_out, InArray gate_up, OutArray d_hidden, OptOutArray d_gate_up_proj,
         OptOutArray d_down_proj, OutArray d_gate_up, OutArray act, uintptr_t stream) {
        const TensorConverter convert{"moe_experts_backward"};
        MoeExpertsInputs in{convert(hidden, "hidden"), convert(expert_offsets, "expert_offsets"),
                            convert(gate_up_proj, "gate_up_proj"),
                            convert(down_proj, "down_proj"), as_stream(stream)};
        MoeExpertsBackwardArgs a;
        a.d_out = convert(d_out, "d_out");
        a.gate_up = convert(gate_up, "gate_up");
        a.d_hidden = convert(d_hidden, "d_hidden");
        a.d_gate_up_proj = convert(d_gate_up_proj, "d_gate_up_proj");
        a.d_down_proj = convert(d_down_proj, "d_down_proj");
        a.d_gate_up = convert(d_gate_up, "d_gate_up");
        a.act = convert(act, "act");
        nb::gil_scoped_release release;
        moe_experts_backward(in, a);
      },
      "hidden"_a, "expert_offsets"_a, "gate_up_proj"_a, "down_proj"_a, "d_out"_a, "gate_up"_a,
      "d_hidden"_a, "d_gate_up_proj"_a.none(), "d_down_proj"_a.none(), "d_gate_up"_a, "act"_a,
      "stream"_a,
      "Experts backward: d_hidden always; weight gradients where given (None: frozen).");
}

}  // namespace flashdelta::python
