// flashdelta._C: the nanobind module between Python and the framework-free C++ API.
//
// Tensors cross as DLPack arrays (convert.h). Each op family binds its functions in its own file
// (bindings.h lists them); this file holds the module, the exception translation and build_info.
// The C++ entry points' flashdelta::Error becomes ValueError / TypeError / NotImplementedError /
// RuntimeError with the message unchanged. The GIL is released while a kernel runs.
//
//   build_info() -> {"cuda": bool, "cuda_archs": str, "cpu_threads": int, "cuda_ops": [str]}
#include "python/bindings.h"
#include "python/convert.h"

using flashdelta::Error;
namespace nb = nanobind;

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

  flashdelta::python::bind_gated_delta_rule_ops(m);
  flashdelta::python::bind_moe_ops(m);
  flashdelta::python::bind_causal_conv1d_ops(m);
  flashdelta::python::bind_fused_linear_cross_entropy_ops(m);
  flashdelta::python::bind_fused_ops(m);
}
