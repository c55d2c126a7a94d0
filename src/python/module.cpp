// flashdelta._C: the nanobind module between Python and the framework-free C++ API.
//
// Every tensor arrives through DLPack as an nb::ndarray of any dtype and device (zero copy: torch
// tensors are exported with `__dlpack__`, which refuses tensors that require grad, so callers pass
// detached tensors) and is turned into a flashdelta::TensorRef here. Inputs are taken read-only,
// outputs writable. Everything else (shape, dtype, device consistency) is checked by the C++ entry
// points, whose flashdelta::Error becomes ValueError / TypeError / NotImplementedError /
// RuntimeError with the message unchanged. The GIL is released while a kernel runs.
//
// Python API (the Python layer, python/flashdelta/ops, depends on these names and argument orders):
//   build_info() -> {"cuda": bool, "cuda_archs": str, "cpu_threads": int, "cuda_ops": [str]}
//   for P in chunk_gated_delta_rule, fused_recurrent_gated_delta_rule:
//     P_forward_workspace_bytes(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm)
//     P_backward_workspace_bytes(...the same 9 arguments...) -> int
//     P_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
//               o, final_state, workspace, stream) -> None
//     P_backward(q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm,
//                d_o, d_final_state, dq, dk, dv, dg, dbeta, d_initial_state, workspace,
//                stream) -> None
//   initial_state, cu_seqlens, final_state, d_final_state, d_initial_state may be None;
//   stream is a cudaStream_t as an integer (0: the legacy default stream; ignored on CPU).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <string>

#include "flashdelta/chunk_gated_delta_rule.h"
#include "flashdelta/fused_recurrent_gated_delta_rule.h"
#include "flashdelta/gated_delta_rule.h"
#include "flashdelta/tensor.h"

namespace nb = nanobind;

namespace {

using flashdelta::DType;
using flashdelta::Error;
using flashdelta::TensorRef;

using InArray = nb::ndarray<nb::ro>;  // an input: never written
using OutArray = nb::ndarray<>;       // an output or workspace
using OptInArray = std::optional<InArray>;
using OptOutArray = std::optional<OutArray>;

std::string dlpack_dtype_name(const nb::dlpack::dtype& dt) {
  // DLPack type codes: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool, 7-13 float8 kinds.
  const char* kind = "unknown";
  switch (dt.code) {
    case 0: kind = "int"; break;
    case 1: kind = "uint"; break;
    case 2: kind = "float"; break;
    case 4: kind = "bfloat"; break;
    case 5: kind = "complex"; break;
    case 6: return "bool";
    default:
      if (dt.code >= 7 && dt.code <= 13) kind = "float8_";
      break;
  }
  std::string name = std::string(kind) + std::to_string(dt.bits);
  if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
  return name;
}

// The flashdelta dtype of a DLPack dtype, or nullopt when flashdelta has none.
std::optional<DType> to_dtype(const nb::dlpack::dtype& dt) {
  if (dt.lanes != 1) return std::nullopt;
  switch (dt.code) {
    case 2:  // float
      if (dt.bits == 32) return DType::kFloat32;
      if (dt.bits == 16) return DType::kFloat16;
      if (dt.bits == 64) return DType::kFloat64;
      break;
    case 4:  // bfloat
      if (dt.bits == 16) return DType::kBFloat16;
      break;
    case 0:  // int
      if (dt.bits == 32) return DType::kInt32;
      if (dt.bits == 64) return DType::kInt64;
      break;
    case 1:  // uint
      if (dt.bits == 8) return DType::kUInt8;
      break;
    default:
      break;
  }
  return std::nullopt;
}

// Converts the arrays of one call, naming the op and the argument in every error.
struct TensorConverter {
  const char* op;

  template <typename Array>
  TensorRef operator()(const Array& a, const char* name) const {
    TensorRef t;
    t.data = const_cast<void*>(static_cast<const void*>(a.data()));  // byte offset included
    const std::optional<DType> dtype = to_dtype(a.dtype());
    if (!dtype) {
      throw Error(Error::Kind::kType, std::string(op) + ": " + name + " has dtype " +
                                          dlpack_dtype_name(a.dtype()) +
                                          ", which flashdelta does not support (float32, "
                                          "float16, bfloat16, float64, int32, int64, uint8)");
    }
    t.dtype = *dtype;
    if (a.device_type() == nb::device::cpu::value) {
      t.device = {flashdelta::DeviceType::kCPU, 0};
    } else if (a.device_type() == nb::device::cuda::value) {
      t.device = {flashdelta::DeviceType::kCUDA, a.device_id()};
    } else {
      throw Error(Error::Kind::kValue, std::string(op) + ": " + name +
                                           " is on a device flashdelta does not support "
                                           "(DLPack device type " +
                                           std::to_string(a.device_type()) +
                                           "); use cpu or cuda tensors");
    }
    const size_t rank = a.ndim();
    if (rank > static_cast<size_t>(flashdelta::kMaxRank)) {
      throw Error(Error::Kind::kValue, std::string(op) + ": " + name + " has " +
                                           std::to_string(rank) + " dimensions, more than any "
                                           "flashdelta argument takes");
    }
    t.rank = static_cast<int>(rank);
    for (size_t d = 0; d < rank; ++d) {
      t.shape[d] = static_cast<int64_t>(a.shape(d));
      t.strides[d] = static_cast<int64_t>(a.stride(d));  // elements, as in DLPack
    }
    return t;
  }

  template <typename Array>
  TensorRef operator()(const std::optional<Array>& a, const char* name) const {
    return a ? (*this)(*a, name) : TensorRef{};  // absent
  }
};

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
using ForwardFn = void (*)(const flashdelta::GatedDeltaRuleInputs&,
                           const flashdelta::GatedDeltaRuleForwardOutputs&);
using BackwardFn = void (*)(const flashdelta::GatedDeltaRuleInputs&,
                            const flashdelta::GatedDeltaRuleBackwardInputs&,
                            const flashdelta::GatedDeltaRuleBackwardOutputs&);

struct GdrOp {
  const char* name;  // e.g. "chunk_gated_delta_rule"
  WorkspaceFn forward_workspace_bytes, backward_workspace_bytes;
  ForwardFn forward;
  BackwardFn backward;
};

// Binds <name>_forward_workspace_bytes, <name>_backward_workspace_bytes, <name>_forward and
// <name>_backward for one op.
void bind_gated_delta_rule(nb::module_& m, const GdrOp& op) {
  using namespace nb::literals;
  const std::string base = op.name;
  // nanobind copies the function names; the lambdas keep their own copy for error messages.
  const std::string fwd_ws = base + "_forward_workspace_bytes";
  const std::string bwd_ws = base + "_backward_workspace_bytes";
  const std::string fwd = base + "_forward";
  const std::string bwd = base + "_backward";

  for (const auto& [fn_name, fn, is_backward] :
       {std::tuple{fwd_ws, op.forward_workspace_bytes, false},
        std::tuple{bwd_ws, op.backward_workspace_bytes, true}}) {
    m.def(
        fn_name.c_str(),
        [fn = fn, fn_name = fn_name](InArray q, InArray k, InArray v, InArray g, InArray beta,
                                     OptInArray initial_state, OptInArray cu_seqlens,
                                     double scale, bool use_qk_l2norm) -> size_t {
          const TensorConverter convert{fn_name.c_str()};
          const auto in = make_inputs(
              convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, 0);
          nb::gil_scoped_release release;
          return fn(in);
        },
        "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
        "scale"_a, "use_qk_l2norm"_a,
        is_backward ? "Workspace bytes the backward needs for these inputs."
                    : "Workspace bytes the forward needs for these inputs.");
  }

  m.def(
      fwd.c_str(),
      [fn = op.forward, fwd](InArray q, InArray k, InArray v, InArray g, InArray beta,
                             OptInArray initial_state, OptInArray cu_seqlens, double scale,
                             bool use_qk_l2norm, OutArray o, OptOutArray final_state,
                             OptOutArray workspace, uintptr_t stream) {
        const TensorConverter convert{fwd.c_str()};
        const auto in = make_inputs(
            convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, stream);
        flashdelta::GatedDeltaRuleForwardOutputs out;
        out.o = convert(o, "o");
        out.final_state = convert(final_state, "final_state");
        out.workspace = convert(workspace, "workspace");
        nb::gil_scoped_release release;
        fn(in, out);
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "initial_state"_a.none(), "cu_seqlens"_a.none(),
      "scale"_a, "use_qk_l2norm"_a, "o"_a, "final_state"_a.none(), "workspace"_a.none(),
      "stream"_a,
      "Forward: writes o (and final_state when given). workspace: uint8, at least "
      "*_forward_workspace_bytes bytes (None when that is 0).");

  m.def(
      bwd.c_str(),
      [fn = op.backward, bwd](InArray q, InArray k, InArray v, InArray g, InArray beta,
                              OptInArray initial_state, OptInArray cu_seqlens, double scale,
                              bool use_qk_l2norm, InArray d_o, OptInArray d_final_state,
                              OutArray dq, OutArray dk, OutArray dv, OutArray dg, OutArray dbeta,
                              OptOutArray d_initial_state, OptOutArray workspace,
                              uintptr_t stream) {
        const TensorConverter convert{bwd.c_str()};
        const auto in = make_inputs(
            convert, {q, k, v, g, beta, initial_state, cu_seqlens, scale, use_qk_l2norm}, stream);
        flashdelta::GatedDeltaRuleBackwardInputs grad_in;
        grad_in.d_o = convert(d_o, "d_o");
        grad_in.d_final_state = convert(d_final_state, "d_final_state");
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
      "Backward: writes dq, dk, dv, dg, dbeta (and d_initial_state, required exactly when "
      "initial_state is given). workspace: uint8, at least *_backward_workspace_bytes bytes.");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flashdelta's compiled kernels (C++ API bindings; use the flashdelta package).";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* type = PyExc_RuntimeError;
      switch (e.kind()) {
        case Error::Kind::kValue: type = PyExc_ValueError; break;
        case Error::Kind::kType: type = PyExc_TypeError; break;
        case Error::Kind::kNotImplemented: type = PyExc_NotImplementedError; break;
        case Error::Kind::kRuntime: type = PyExc_RuntimeError; break;
      }
      PyErr_SetString(type, e.what());
    }
  });

  m.def(
      "build_info",
      [] {
        const flashdelta::BuildInfo info = flashdelta::build_info();
        nb::dict d;
        d["cuda"] = info.cuda;
        d["cuda_archs"] = info.cuda_archs;
        d["cpu_threads"] = info.cpu_threads;
        d["cuda_ops"] = info.cuda_ops;
        return d;
      },
      "What this build contains: {'cuda': bool, 'cuda_archs': str, 'cpu_threads': int, "
      "'cuda_ops': ['op.forward', 'op.backward' entries of the CUDA kernels built]}.");

  bind_gated_delta_rule(
      m, {"chunk_gated_delta_rule", flashdelta::chunk_gated_delta_rule_forward_workspace_bytes,
          flashdelta::chunk_gated_delta_rule_backward_workspace_bytes,
          flashdelta::chunk_gated_delta_rule_forward, flashdelta::chunk_gated_delta_rule_backward});
  bind_gated_delta_rule(
      m, {"fused_recurrent_gated_delta_rule",
          flashdelta::fused_recurrent_gated_delta_rule_forward_workspace_bytes,
          flashdelta::fused_recurrent_gated_delta_rule_backward_workspace_bytes,
          flashdelta::fused_recurrent_gated_delta_rule_forward,
          flashdelta::fused_recurrent_gated_delta_rule_backward});
}
