// Bindings of causal_conv1d (forward, backward) and causal_conv1d_update.
//
//   causal_conv1d_backward_workspace_bytes(x, weight, bias, cu_seqlens, silu) -> int
//   causal_conv1d_forward(x, weight, bias, cu_seqlens, silu, y, stream) -> None
//   causal_conv1d_backward(x, weight, bias, cu_seqlens, silu, dy, dx, dweight, dbias,
//                          workspace, stream) -> None
//   causal_conv1d_update(x, conv_state, weight, bias, silu, y, stream) -> None  (conv_state is
//                        updated in place)
// bias, cu_seqlens, dbias, workspace may be None; stream is a cudaStream_t as an integer.
#include "flashdelta/causal_conv1d.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace flashdelta::python {
namespace {

flashdelta::CausalConv1dInputs make_inputs(const TensorConverter& convert, const InArray& x,
                                           const InArray& weight, const OptInArray& bias,
                                           const OptInArray& cu_seqlens, bool silu,
                                           uintptr_t stream) {
  flashdelta::CausalConv1dInputs in;
  in.x = convert(x, "x");
  in.weight = convert(weight, "weight");
  in.bias = convert(bias, "bias");
  in.cu_seqlens = convert(cu_seqlens, "cu_seqlens");
  in.silu = silu;
  in.stream = reinterpret_cast<void*>(stream);
  return in;
}

}  // namespace

void bind_causal_conv1d_ops(nb::module_& m) {
  using namespace nb::literals;

  m.def(
      "causal_conv1d_backward_workspace_bytes",
      [](InArray x, InArray weight, OptInArray bias, OptInArray cu_seqlens, bool silu) -> size_t {
        const TensorConverter convert{"causal_conv1d_backward_workspace_bytes"};
        const auto in = make_inputs(convert, x, weight, bias, cu_seqlens, silu, 0);
        nb::gil_scoped_release release;
        return flashdelta::causal_conv1d_backward_workspace_bytes(in);
      },
      "x"_a, "weight"_a, "bias"_a.none(), "cu_seqlens"_a.none(), "silu"_a,
      "Workspace bytes the backward needs for these inputs.");

  m.def(
      "causal_conv1d_forward",
      [](InArray x, InArray weight, OptInArray bias, OptInArray cu_seqlens, bool silu, OutArray y,
         uintptr_t stream) {
        const TensorConverter convert{"causal_conv1d_forward"};
        const auto in = make_inputs(convert, x, weight, bias, cu_seqlens, silu, stream);
        flashdelta::CausalConv1dForwardOutputs out;
        out.y = convert(y, "y");
        nb::gil_scoped_release release;
        flashdelta::causal_conv1d_forward(in, out);
      },
      "x"_a, "weight"_a, "bias"_a.none(), "cu_seqlens"_a.none(), "silu"_a, "y"_a, "stream"_a,
      "Forward: writes y [B, C, T].");

  m.def(
      "causal_conv1d_backward",
      [](InArray x, InArray weight, OptInArray bias, OptInArray cu_seqlens, bool silu, InArray dy,
         OutArray dx, OutArray dweight, OptOutArray dbias, OptOutArray workspace,
         uintptr_t stream) {
        const TensorConverter convert{"causal_conv1d_backward"};
        const auto in = make_inputs(convert, x, weight, bias, cu_seqlens, silu, stream);
        flashdelta::CausalConv1dBackwardInputs grad_in;
        grad_in.dy = convert(dy, "dy");
        flashdelta::CausalConv1dBackwardOutputs grad_out;
        grad_out.dx = convert(dx, "dx");
        grad_out.dweight = convert(dweight, "dweight");
        grad_out.dbias = convert(dbias, "dbias");
        grad_out.workspace = convert(workspace, "workspace");
        nb::gil_scoped_release release;
        flashdelta::causal_conv1d_backward(in, grad_in, grad_out);
      },
      "x"_a, "weight"_a, "bias"_a.none(), "cu_seqlens"_a.none(), "silu"_a, "dy"_a, "dx"_a,
      "dweight"_a, "dbias"_a.none(), "workspace"_a.none(), "stream"_a,
      "Backward: writes dx, dweight (and dbias, required exactly when bias is given). "
      "workspace: uint8, at least causal_conv1d_backward_workspace_bytes bytes.");

  m.def(
      "causal_conv1d_update",
      [](InArray x, OutArray conv_state, InArray weight, OptInArray bias, bool silu, OutArray y,
         uintptr_t stream) {
        const TensorConverter convert{"causal_conv1d_update"};
        flashdelta::CausalConv1dUpdateArgs a;
        a.x = convert(x, "x");
        a.conv_state = convert(conv_state, "conv_state");
        a.weight = convert(weight, "weight");
        a.bias = convert(bias, "bias");
        a.y = convert(y, "y");
        a.silu = silu;
        a.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        flashdelta::causal_conv1d_update(a);
      },
      "x"_a, "conv_state"_a, "weight"_a, "bias"_a.none(), "silu"_a, "y"_a, "stream"_a,
      "Decode step: writes y [B, C, L] and shifts the L new inputs into conv_state in place.");
}

}  // namespace flashdelta::python
