// The binding functions of flashdelta._C, one per op family (each in src/python/<family>.cpp).
// Adding an op family: write its file, declare its function here, call it from module.cpp.
#pragma once

#include <nanobind/nanobind.h>

namespace flashdelta::python {

void bind_gated_delta_rule_ops(nanobind::module_& m);
void bind_moe_ops(nanobind::module_& m);
void bind_causal_conv1d_ops(nanobind::module_& m);
void bind_fused_linear_cross_entropy_ops(nanobind::module_& m);
void bind_fused_ops(nanobind::module_& m);  // rms_norm(_gated), swiglu, attention_gate, rope

}  // namespace flashdelta::python
