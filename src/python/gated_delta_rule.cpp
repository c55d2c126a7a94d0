// Bindings of the gated delta rule ops (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule).
//
// For P in chunk_gated_delta_rule, fused_recurrent_gated_delta_rule:
//   P_forward_workspace_bytes(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
//                             with_saved=False) -> int
//   P_backward_workspace_bytes(...the same 9 arguments..., with_saved=False) -> int
//   P_saved_bytes(...the same 9 arguments...) -> int
//   P_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
//             o, final_state, workspace, stream, saved=None) -> None
//   P_backward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
//              d_o, d_final_state, dq, dk, dv, dg, dbeta, d_initial_state, workspace,
//              stream, saved=None) -> None
// initial_state, cu_seqlens, final_state, d_final_state, d_initial_state, saved may be None;
// stream is a cudaStream_t as an integer (0: the legacy default stream; ignored on CPU).
#include <tuple>

#include "flashdelta/chunk_gated_delta_rule.h"
#include "flashdelta/fused_recurrent_gated_delta_rule.h"
#include "flashdelta/gated_delta_rule.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace flashdelta::python {
namespace {

// The arguments every gated delta rule entry point starts with.
struct GdrArgs {
  InArray q, k, v, g, beta;
  OptInArray initial_state, cu_seqlens;
  double scale;
  bool use_qk_l2norm;
};

flashdelta::GatedDeltaRuleInputs make_inputs(const TensorConverter& convert, const GdrArgs& a,
                                             uintptr_t stream) {
  flashdelta::GatedDeltaRuleInputs in;
  in.q = convert(a.q, "q");
  in.k = convert(a.k, "k");
  in.v = convert(a.v, "v");
  in.g = convert(a.g, "g");
  in.beta = convert(a.beta, "beta");
  in.initial_state = convert(a.initial_state, "initial_state");
  in.cu_seqlens = convert(a.cu_seqlens, "cu_seqlens");
  in.scale = a.scale;
  in.use_qk_l2norm = a.use_qk_l2norm;
  in.stream = reinterpret_cast<void*>(stream);
  return in;
}

using WorkspaceFn = size_t (*)(const flashdelta::GatedDeltaRuleInputs&);
using WorkspaceWithSavedFn = size_t (*)(const flashdelta::GatedDeltaRuleInputs&, bool);
using ForwardFn = void (*)(const flashdelta::GatedDeltaRuleInputs&,
                           const flashdelta::GatedDeltaRuleForwardOutputs&);
using BackwardFn = void (*)(const flashdelta::GatedDeltaRuleInputs&,
                            const flashdelta::GatedDeltaRuleBackwardInputs&,
                            const flashdelta::GatedDeltaRuleBackwardOutputs&);

struct GdrOp {
  const char* name;  // e.g. "chunk_gated_delta_rule"
  WorkspaceWithSavedFn forward_workspace_bytes;
  WorkspaceWithSavedFn backward_workspace_bytes;
  WorkspaceFn saved_bytes;
  ForwardFn forward;
  BackwardFn backward;
};

// Binds <name>_forward_workspace_bytes, <name>_backward_workspace_bytes, <name>_saved_bytes,
// <name>_forward and <name>_backward for one op.
void bind_gated_delta_rule(nb::module_& m, const GdrOp& op) {
  using namespace nb::literals;
  const std::string base = op.name;
  // nanobind copies the function names; the lambdas keep their own copy for error messages.
  const std::string fwd_ws = base + "_forward_workspace_bytes";
  const std::string bwd_ws = base + "_backward_workspace_bytes";
  const std::string saved_name = base + "_saved_bytes";
  const std::string fwd = base + "_forward";
  const std::string bwd = base + "_backward";

  m.def(
      saved_name.c_str(),
      [fn = op.saved_bytes, saved_name](InArray q, InArray k, InArray v, InArray g, InArray beta,
                                        OptInArray initial_state, OptInArray cu_seqlens,
                                        double scale, bool use_qk_l2norm) -> size_t {
        const TensorConverter convert{saved_name.c_str()};
        const auto in = make_inputs(
            convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, 0);
        nb::gil_scoped_release release;
        return fn(in);
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
      "scale"_a, "use_qk_l2norm"_a,
      "Bytes of the forward's optional `saved` output for these inputs (0: the op keeps nothing "
      "for its backward on this device).");
  for (const auto& [fn_name, fn, doc] :
       {std::tuple{fwd_ws, op.forward_workspace_bytes,
                   "Workspace bytes the forward needs for these inputs (with_saved: when it "
                   "writes `saved`)."},
        std::tuple{bwd_ws, op.backward_workspace_bytes,
                   "Workspace bytes the backward needs for these inputs (with_saved: when it is "
                   "given the forward's `saved`)."}}) {
    m.def(
        fn_name.c_str(),
        [fn = fn, fn_name = fn_name](InArray q, InArray k, InArray v, InArray g, InArray beta,
                                     OptInArray initial_state, OptInArray cu_seqlens,
                                     double scale, bool use_qk_l2norm,
                                     bool with_saved) -> size_t {
          const TensorConverter convert{fn_name.c_str()};
          const auto in = make_inputs(
              convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, 0);
          nb::gil_scoped_release release;
          return fn(in, with_saved);
        },
        "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
        "scale"_a, "use_qk_l2norm"_a, "with_saved"_a = false, doc);
  }

  m.def(
      fwd.c_str(),
      [fn = op.forward, fwd](InArray q, InArray k, InArray v, InArray g, InArray beta,
                             OptInArray initial_state, OptInArray cu_seqlens, double scale,
                             bool use_qk_l2norm, OutArray o, OptOutArray final_state,
                             OptOutArray workspace, uintptr_t stream, OptOutArray saved) {
        const TensorConverter convert{fwd.c_str()};
        const auto in = make_inputs(
            convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, stream);
        flashdelta::GatedDeltaRuleForwardOutputs out;
        out.o = convert(o, "o");
        out.final_state = convert(final_state, "final_state");
        out.workspace = convert(workspace, "workspace");
        out.saved = convert(saved, "saved");
        nb::gil_scoped_release release;
        fn(in, out);
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
      "scale"_a, "use_qk_l2norm"_a, "o"_a, "final_state"_a.none(), "workspace"_a.none(),
      "stream"_a, "saved"_a.none() = nb::none(),
      "Forward: writes o (and final_state when given). workspace: uint8, at least "
      "*_forward_workspace_bytes bytes (with_saved=True when saved is given; None when that is "
      "0). saved (training, optional): uint8, "
      "*_saved_bytes bytes, for the backward of the same inputs.");

  m.def(
      bwd.c_str(),
      [fn = op.backward, bwd](InArray q, InArray k, InArray v, InArray g, InArray beta,
                              OptInArray initial_state, OptInArray cu_seqlens, double scale,
                              bool use_qk_l2norm, InArray d_o, OptInArray d_final_state,
                              OutArray dq, OutArray dk, OutArray dv, OutArray dg, OutArray dbeta,
                              OptOutArray d_initial_state, OptOutArray workspace,
                              uintptr_t stream, OptInArray saved) {
        const TensorConverter convert{bwd.c_str()};
        const auto in = make_inputs(
            convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, stream);
        flashdelta::GatedDeltaRuleBackwardInputs grad_in;
        grad_in.d_o = convert(d_o, "d_o");
        grad_in.d_final_state = convert(d_final_state, "d_final_state");
        grad_in.saved = convert(saved, "saved");
        flashdelta::GatedDeltaRuleBackwardOutputs grad_out;
        grad_out.dq = convert(dq, "dq");
        grad_out.dk = convert(dk, "dk");
        grad_out.dv = convert(dv, "dv");
        grad_out.dg = convert(dg, "dg");
        grad_out.dbeta = convert(dbeta, "dbeta");
        grad_out.d_initial_state = convert(d_initial_state, "d_initial_state");
        grad_out.workspace = convert(workspace, "workspace");
        nb::gil_scoped_release release;
        fn(in, grad_in, grad_out);
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
      "scale"_a, "use_qk_l2norm"_a, "d_o"_a, "d_final_state"_a.none(), "dq"_a, "dk"_a, "dv"_a,
      "dg"_a, "dbeta"_a, "d_initial_state"_a.none(), "workspace"_a.none(), "stream"_a,
      "saved"_a.none() = nb::none(),
      "Backward: writes dq, dk, dv, dg, dbeta (and d_initial_state, required exactly when "
      "initial_state is given). workspace: uint8, at least *_backward_workspace_bytes bytes "
      "(with_saved=True when saved, the forward's, is given).");
}

}  // namespace

void bind_gated_delta_rule_ops(nb::module_& m) {
  bind_gated_delta_rule(
      m, {"chunk_gated_delta_rule", flashdelta::chunk_gated_delta_rule_forward_workspace_bytes,
          flashdelta::chunk_gated_delta_rule_backward_workspace_bytes,
          flashdelta::chunk_gated_delta_rule_saved_bytes,
          flashdelta::chunk_gated_delta_rule_forward, flashdelta::chunk_gated_delta_rule_backward});
  bind_gated_delta_rule(
      m, {"fused_recurrent_gated_delta_rule",
          flashdelta::fused_recurrent_gated_delta_rule_forward_workspace_bytes,
          flashdelta::fused_recurrent_gated_delta_rule_backward_workspace_bytes,
          flashdelta::fused_recurrent_gated_delta_rule_saved_bytes,
          flashdelta::fused_recurrent_gated_delta_rule_forward,
          flashdelta::fused_recurrent_gated_delta_rule_backward});
}

}  // namespace flashdelta::python
