// Bindings of the fused layer ops (include/flashdelta/rms_norm.h, gated_product.h,
// partial_rotary_embedding.h). stream: a cudaStream_t as an integer (ignored on CPU).
//
// For P in rms_norm, rms_norm_gated (gate is None for rms_norm, required for rms_norm_gated):
//   P_forward(x, gate, weight, eps, y, rstd, stream)
//   P_backward_workspace_bytes(x, gate, weight, eps) -> int
//   P_backward(x, gate, weight, eps, rstd, dy, dx, dgate, dweight, workspace, stream)
// swiglu_forward(gate, up, out, stream); swiglu_backward(gate, up, d_out, d_gate, d_up, stream)
// attention_gate_forward(attn, gate, out, stream);
// attention_gate_backward(attn, gate, d_out, d_attn, d_gate, stream)
// partial_rotary_embedding_forward(q, k, cos, sin, q_out, k_out, stream)
// partial_rotary_embedding_backward(dq_out, dk_out, cos, sin, dq, dk, stream)
#include <string>

#include "flashdelta/gated_product.h"
#include "flashdelta/partial_rotary_embedding.h"
#include "flashdelta/rms_norm.h"
#include "python/bindings.h"
#include "python/convert.h"

namespace flashdelta::python {
namespace {

using namespace nb::literals;

flashdelta::RmsNormInputs rms_inputs(const TensorConverter& c, const InArray& x,
                                     const OptInArray& gate, const InArray& weight, double eps,
                                     uintptr_t stream) {
  flashdelta::RmsNormInputs in;
  in.x = c(x, "x");
  in.gate = c(gate, "gate");
  in.weight = c(weight, "weight");
  in.eps = eps;
  in.stream = reinterpret_cast<void*>(stream);
  return in;
}

struct RmsNormOp {
  const char* name;
  void (*forward)(const flashdelta::RmsNormInputs&, const flashdelta::RmsNormForwardOutputs&);
  size_t (*workspace)(const flashdelta::RmsNormInputs&);
  void (*backward)(const flashdelta::RmsNormInputs&, const flashdelta::RmsNormBackwardArgs&);
};

void bind_rms_norm(nb::module_& m, const RmsNormOp& op) {
  const std::string fwd = std::string(op.name) + "_forward";
  const std::string ws = std::string(op.name) + "_backward_workspace_bytes";
  const std::string bwd = std::string(op.name) + "_backward";
  m.def(
      fwd.c_str(),
      [fn = op.forward, fwd](InArray x, OptInArray gate, InArray weight, double eps, OutArray y,
                             OutArray rstd, uintptr_t stream) {
        const TensorConverter c{fwd.c_str()};
        const auto in = rms_inputs(c, x, gate, weight, eps, stream);
        flashdelta::RmsNormForwardOutputs out;
        out.y = c(y, "y");
        out.rstd = c(rstd, "rstd");
        nb::gil_scoped_release release;
        fn(in, out);
      },
      "x"_a, "gate"_a.none(), "weight"_a, "eps"_a, "y"_a, "rstd"_a, "stream"_a,
      "Forward: writes y [R, D] and rstd [R] (fp32).");
  m.def(
      ws.c_str(),
      [fn = op.workspace, ws](InArray x, OptInArray gate, InArray weight, double eps) -> size_t {
        const TensorConverter c{ws.c_str()};
        const auto in = rms_inputs(c, x, gate, weight, eps, 0);
        nb::gil_scoped_release release;
        return fn(in);
      },
      "x"_a, "gate"_a.none(), "weight"_a, "eps"_a, "Workspace bytes the backward needs.");
  m.def(
      bwd.c_str(),
      [fn = op.backward, bwd](InArray x, OptInArray gate, InArray weight, double eps,
                              InArray rstd, InArray dy, OutArray dx, OptOutArray dgate,
                              OutArray dweight, OptOutArray workspace, uintptr_t stream) {
        const TensorConverter c{bwd.c_str()};
        const auto in = rms_inputs(c, x, gate, weight, eps, stream);
        flashdelta::RmsNormBackwardArgs a;
        a.rstd = c(rstd, "rstd");
        a.dy = c(dy, "dy");
        a.dx = c(dx, "dx");
        a.dgate = c(dgate, "dgate");
        a.dweight = c(dweight, "dweight");
        a.workspace = c(workspace, "workspace");
        nb::gil_scoped_release release;
        fn(in, a);
      },
      "x"_a, "gate"_a.none(), "weight"_a, "eps"_a, "rstd"_a, "dy"_a, "dx"_a, "dgate"_a.none(),
      "dweight"_a, "workspace"_a.none(), "stream"_a,
      "Backward: writes dx, dweight (and dgate for rms_norm_gated).");
}

struct GatedProductOp {
  const char* name;
  const char* value;  // the name of the non-gate operand
  bool gate_first;    // argument order: (gate, up) for swiglu, (attn, gate) for attention_gate
  void (*forward)(const flashdelta::GatedProductArgs&, const flashdelta::TensorRef&);
  void (*backward)(const flashdelta::GatedProductArgs&, const flashdelta::GatedProductGradients&);
};

void bind_gated_product(nb::module_& m, const GatedProductOp& op) {
  const std::string fwd = std::string(op.name) + "_forward";
  const std::string bwd = std::string(op.name) + "_backward";
  const std::string value = op.value, d_value = std::string("d_") + op.value;
  m.def(
      fwd.c_str(),
      [op, fwd, value](InArray first, InArray second, OutArray out, uintptr_t stream) {
        const TensorConverter c{fwd.c_str()};
        flashdelta::GatedProductArgs in;
        in.gate = c(op.gate_first ? first : second, "gate");
        in.value = c(op.gate_first ? second : first, value.c_str());
        in.stream = reinterpret_cast<void*>(stream);
        const auto o = c(out, "out");
        nb::gil_scoped_release release;
        op.forward(in, o);
      },
      op.gate_first ? "gate"_a : nb::arg(op.value), op.gate_first ? nb::arg(op.value) : "gate"_a,
      "out"_a, "stream"_a, "Forward: writes out.");
  m.def(
      bwd.c_str(),
      [op, bwd, value, d_value](InArray first, InArray second, InArray d_out, OutArray d_first,
                                OutArray d_second, uintptr_t stream) {
        const TensorConverter c{bwd.c_str()};
        flashdelta::GatedProductArgs in;
        in.gate = c(op.gate_first ? first : second, "gate");
        in.value = c(op.gate_first ? second : first, value.c_str());
        in.stream = reinterpret_cast<void*>(stream);
        flashdelta::GatedProductGradients g;
        g.d_out = c(d_out, "d_out");
        g.d_gate = c(op.gate_first ? d_first : d_second, "d_gate");
        g.d_value = c(op.gate_first ? d_second : d_first, d_value.c_str());
        nb::gil_scoped_release release;
        op.backward(in, g);
      },
      op.gate_first ? "gate"_a : nb::arg(op.value), op.gate_first ? nb::arg(op.value) : "gate"_a,
      "d_out"_a, op.gate_first ? "d_gate"_a : nb::arg(d_value.c_str()),
      op.gate_first ? nb::arg(d_value.c_str()) : "d_gate"_a, "stream"_a,
      "Backward: writes the gradients of both operands (same argument order).");
}

void bind_rotary(nb::module_& m) {
  m.def(
      "partial_rotary_embedding_forward",
      [](InArray q, InArray k, InArray cos, InArray sin, OutArray q_out, OutArray k_out,
         uintptr_t stream) {
        const TensorConverter c{"partial_rotary_embedding_forward"};
        flashdelta::PartialRotaryEmbeddingArgs in;
        in.q = c(q, "q");
        in.k = c(k, "k");
        in.cos = c(cos, "cos");
        in.sin = c(sin, "sin");
        in.stream = reinterpret_cast<void*>(stream);
        const auto qo = c(q_out, "q_out"), ko = c(k_out, "k_out");
        nb::gil_scoped_release release;
        flashdelta::partial_rotary_embedding_forward(in, qo, ko);
      },
      "q"_a, "k"_a, "cos"_a, "sin"_a, "q_out"_a, "k_out"_a, "stream"_a,
      "Forward: q_out, k_out = rope(q), rope(k) over the first cos.shape[-1] channels.");
  m.def(
      "partial_rotary_embedding_backward",
      [](InArray dq_out, InArray dk_out, InArray cos, InArray sin, OutArray dq, OutArray dk,
         uintptr_t stream) {
        const TensorConverter c{"partial_rotary_embedding_backward"};
        flashdelta::PartialRotaryEmbeddingArgs in;
        in.q = c(dq_out, "dq_out");
        in.k = c(dk_out, "dk_out");
        in.cos = c(cos, "cos");
        in.sin = c(sin, "sin");
        in.stream = reinterpret_cast<void*>(stream);
        const auto dqr = c(dq, "dq"), dkr = c(dk, "dk");
        nb::gil_scoped_release release;
        flashdelta::partial_rotary_embedding_backward(in, dqr, dkr);
      },
      "dq_out"_a, "dk_out"_a, "cos"_a, "sin"_a, "dq"_a, "dk"_a, "stream"_a,
      "Backward: dq, dk from dq_out, dk_out (the transposed rotation).");
}

}  // namespace

void bind_fused_ops(nb::module_& m) {
  bind_rms_norm(m, {"rms_norm", flashdelta::rms_norm_forward,
                    flashdelta::rms_norm_backward_workspace_bytes, flashdelta::rms_norm_backward});
  bind_rms_norm(m, {"rms_norm_gated", flashdelta::rms_norm_gated_forward,
                    flashdelta::rms_norm_gated_backward_workspace_bytes,
                    flashdelta::rms_norm_gated_backward});
  bind_gated_product(m, {"swiglu", "up", true, flashdelta::swiglu_forward,
                         flashdelta::swiglu_backward});
  bind_gated_product(m, {"attention_gate", "attn", false, flashdelta::attention_gate_forward,
                         flashdelta::attention_gate_backward});
  bind_rotary(m);
}

}  // namespace flashdelta::python
