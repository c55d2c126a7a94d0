// Bindings of fused_linear_cross_entropy (include/flashdelta/fused_linear_cross_entropy.h).
//
//   fused_linear_cross_entropy_chunk_rows(hidden, weight, target, ignore_index, chunk_rows,
//                                         weight_grad) -> int
//   fused_linear_cross_entropy_workspace_bytes(...the same 6 arguments...) -> int
//   fused_linear_cross_entropy_forward(hidden, weight, target, ignore_index, chunk_rows,
//                                      weight_grad, loss_sum, num_valid, d_hidden_sum,
//                                      d_weight_sum, workspace, stream) -> None
//   fused_linear_cross_entropy_backward(grad_scale, d_hidden_sum, d_weight_sum, d_hidden,
//                                       d_weight, stream) -> None
// d_weight_sum, workspace, d_weight may be None; stream is a cudaStream_t as an integer.
#include "flashdelta/fused_linear_cross_entropy.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace flashdelta::python {
namespace {

flashdelta::FusedLinearCrossEntropyInputs make_inputs(const TensorConverter& convert,
                                                      const InArray& hidden,
                                                      const InArray& weight,
                                                      const InArray& target,
                                                      int64_t ignore_index, int64_t chunk_rows,
                                                      bool weight_grad, uintptr_t stream) {
  flashdelta::FusedLinearCrossEntropyInputs in;
  in.hidden = convert(hidden, "hidden");
  in.weight = convert(weight, "weight");
  in.target = convert(target, "target");
  in.ignore_index = ignore_index;
  in.chunk_rows = chunk_rows;
  in.weight_grad = weight_grad;
  in.stream = reinterpret_cast<void*>(stream);
  return in;
}

}  // namespace

void bind_fused_linear_cross_entropy_ops(nb::module_& m) {
  using namespace nb::literals;

  m.def(
      "fused_linear_cross_entropy_chunk_rows",
      [](InArray hidden, InArray weight, InArray target, int64_t ignore_index, int64_t chunk_rows,
         bool weight_grad) -> int64_t {
        const TensorConverter convert{"fused_linear_cross_entropy_chunk_rows"};
        const auto in = make_inputs(convert, hidden, weight, target, ignore_index, chunk_rows,
                                    weight_grad, 0);
        return flashdelta::fused_linear_cross_entropy_chunk_rows(in);
      },
      "hidden"_a, "weight"_a, "target"_a, "ignore_index"_a, "chunk_rows"_a, "weight_grad"_a,
      "Tokens per chunk the forward uses for these inputs.");

  m.def(
      "fused_linear_cross_entropy_workspace_bytes",
      [](InArray hidden, InArray weight, InArray target, int64_t ignore_index, int64_t chunk_rows,
         bool weight_grad) -> size_t {
        const TensorConverter convert{"fused_linear_cross_entropy_workspace_bytes"};
        const auto in = make_inputs(convert, hidden, weight, target, ignore_index, chunk_rows,
                                    weight_grad, 0);
        return flashdelta::fused_linear_cross_entropy_workspace_bytes(in);
      },
      "hidden"_a, "weight"_a, "target"_a, "ignore_index"_a, "chunk_rows"_a, "weight_grad"_a,
      "Workspace bytes the forward needs for these inputs.");

  m.def(
      "fused_linear_cross_entropy_forward",
      [](InArray hidden, InArray weight, InArray target, int64_t ignore_index, int64_t chunk_rows,
         bool weight_grad, OutArray loss_sum, OutArray num_valid, OutArray d_hidden_sum,
         OptOutArray d_weight_sum, OptOutArray workspace, uintptr_t stream) {
        const TensorConverter convert{"fused_linear_cross_entropy_forward"};
        const auto in = make_inputs(convert, hidden, weight, target, ignore_index, chunk_rows,
                                    weight_grad, stream);
        flashdelta::FusedLinearCrossEntropyForwardOutputs out;
        out.loss_sum = convert(loss_sum, "loss_sum");
        out.num_valid = convert(num_valid, "num_valid");
        out.d_hidden_sum = convert(d_hidden_sum, "d_hidden_sum");
        out.d_weight_sum = convert(d_weight_sum, "d_weight_sum");
        out.workspace = convert(workspace, "workspace");
        nb::gil_scoped_release release;
        flashdelta::fused_linear_cross_entropy_forward(in, out);
      },
      "hidden"_a, "weight"_a, "target"_a, "ignore_index"_a, "chunk_rows"_a, "weight_grad"_a,
      "loss_sum"_a, "num_valid"_a, "d_hidden_sum"_a, "d_weight_sum"_a.none(),
      "workspace"_a.none(), "stream"_a,
      "Forward: writes loss_sum, num_valid and the gradients of loss_sum (d_hidden_sum fp32, "
      "d_weight_sum when weight_grad).");

  m.def(
      "fused_linear_cross_entropy_backward",
      [](InArray grad_scale, InArray d_hidden_sum, OptInArray d_weight_sum, OutArray d_hidden,
         OptOutArray d_weight, uintptr_t stream) {
        const TensorConverter convert{"fused_linear_cross_entropy_backward"};
        flashdelta::FusedLinearCrossEntropyBackwardArgs a;
        a.grad_scale = convert(grad_scale, "grad_scale");
        a.d_hidden_sum = convert(d_hidden_sum, "d_hidden_sum");
        a.d_weight_sum = convert(d_weight_sum, "d_weight_sum");
        a.d_hidden = convert(d_hidden, "d_hidden");
        a.d_weight = convert(d_weight, "d_weight");
        a.stream = reinterpret_cast<void*>(stream);
        nb::gil_scoped_release release;
        flashdelta::fused_linear_cross_entropy_backward(a);
      },
      "grad_scale"_a, "d_hidden_sum"_a, "d_weight_sum"_a.none(), "d_hidden"_a,
      "d_weight"_a.none(), "stream"_a,
      "Backward: d_hidden = grad_scale * d_hidden_sum (and d_weight likewise).");
}

}  // namespace flashdelta::python
