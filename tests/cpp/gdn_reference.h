// Test support for the gated delta rule ops (chunk_gated_delta_rule, fused_recurrent_...):
//  - host buffers of any dtype and layout that hand out TensorRefs (HostTensor),
//  - random problems with the Qwen3.5 gate (Problem / make_problem),
//  - the naive per-token recurrence in double, forward and backward (reference_forward /
//    reference_backward), and the loss used for finite differences,
//  - the checks shared by the per-op test files (forward/backward against the reference,
//    backward against finite differences).
//
// The reference is the ground truth: it is the recurrence written out token by token,
//   S_t = exp(g_t) S_{t-1};  u = S_t^T k_t;  S_t += k_t (beta_t (v_t - u))^T;  o_t = scale S_t^T
//   q_t
// with q, k optionally l2-normalised (x / sqrt(|x|^2 + 1e-6)), and its backward is checked
// against finite differences in test_gdn_reference.cpp.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "flashdelta/chunk_gated_delta_rule.h"
#include "flashdelta/fused_recurrent_gated_delta_rule.h"
#include "flashdelta/tensor.h"

namespace gdn_test {

using flashdelta::DType;
using flashdelta::GatedDeltaRuleBackwardInputs;
using flashdelta::GatedDeltaRuleBackwardOutputs;
using flashdelta::GatedDeltaRuleForwardOutputs;
using flashdelta::GatedDeltaRuleInputs;
using flashdelta::TensorRef;

// ---------------------------------------------------------------------------------------------
// Scalar conversions.

uint16_t float_to_bf16_bits(float x);  // round to nearest even; NaN stays NaN
float bf16_bits_to_float(uint16_t bits);
uint16_t float_to_fp16_bits(float x);  // via _Float16 (round to nearest even)
float fp16_bits_to_float(uint16_t bits);
// x rounded to what a `dtype` element can hold, as a double.
double round_to(double x, DType dtype);

// Small deterministic generator (splitmix64), independent of the standard library's
// distributions so that seeds mean the same thing everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next();
  double uniform();                      // [0, 1)
  double uniform(double lo, double hi);  // [lo, hi)
  double normal();
  int64_t below(int64_t n);  // [0, n)

 private:
  uint64_t state_;
};

// ---------------------------------------------------------------------------------------------
// Host buffers.

// How a HostTensor lays out its elements: `pad[d]` extra (never read) elements along dim d,
// and `order`, the storage order of the dims from outermost to innermost (empty: 0, 1, ...).
// The default layout is contiguous.
struct Layout {
  std::vector<int64_t> pad;
  std::vector<int> order;
};

// A CPU buffer of any dtype with a shape and (possibly non-contiguous) strides. New buffers are
// "poisoned": every byte is 0xFF (NaN for every float dtype), so an output element a kernel
// forgets to write, or a padding element it reads, shows up as NaN.
class HostTensor {
 public:
  HostTensor() = default;  // absent
  HostTensor(DType dtype, std::vector<int64_t> shape, const Layout& layout = {});
  static HostTensor from_values(DType dtype, std::vector<int64_t> shape,
                                const std::vector<double>& values, const Layout& layout = {});

  bool defined() const { return defined_; }
  TensorRef ref() const;  // absent TensorRef when !defined()
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t numel() const;

  // Element `flat` (row-major index over the logical shape).
  double get(int64_t flat) const;
  void set(int64_t flat, double x);    // rounds to the dtype
  std::vector<double> values() const;  // all elements, row-major, as doubles
  void set_values(const std::vector<double>& values);
  void fill(double x);

  const std::vector<unsigned char>& bytes() const { return bytes_; }
  // Every storage byte that is not part of a logical element is still 0xFF.
  bool padding_untouched() const;

 private:
  int64_t offset(int64_t flat) const;  // storage element offset
  bool defined_ = false;
  DType dtype_ = DType::kFloat32;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
  std::vector<unsigned char> bytes_;
};

// ---------------------------------------------------------------------------------------------
// Problems.

enum class Gate {
  kRealistic,  // g = -A softplus(a + 1), A ~ U(0.01, 16) per value head, a ~ N(0, 1)
  kStrong,     // g ~ U(-30, 0): states forgotten within a token or two
  kMild,       // g ~ log U(0.9, 1): long memory, so the state carries across chunks
};

struct ProblemSpec {
  std::string name;  // for test names
  int64_t B = 1, T = 1, H = 1, HV = 1, K = 8, V = 8;
  std::vector<int64_t> cu_seqlens;  // empty: not varlen (else B == 1, back() == T)
  DType cu_dtype = DType::kInt64;
  DType dtype = DType::kFloat64;  // q, k, v
  bool gate_dtype_set = false;    // g and beta in gate_dtype instead of dtype
  DType gate_dtype = DType::kFloat32;
  bool l2norm = false;
  bool initial_state = false;
  bool final_state = false;   // ask the forward for final_state
  bool d_final_state = true;  // (backward) pass d_final_state when final_state is asked for
  double scale = 0.0;         // <= 0: K^-0.5
  Gate gate = Gate::kRealistic;
  uint64_t seed = 1;
  Layout q_layout, k_layout, v_layout, g_layout, beta_layout, h0_layout;
  int fd_samples = 40;  // (backward, f64) finite-difference samples per gradient

  int64_t num_seqs() const { return cu_seqlens.empty() ? B : int64_t(cu_seqlens.size()) - 1; }
  DType state_dtype() const { return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }
  DType gates_dtype() const { return gate_dtype_set ? gate_dtype : dtype; }
};

// The problem as the reference sees it: contiguous doubles (the values the op sees, i.e. after
// rounding to the op's dtypes) and the resolved scale.
struct RefProblem {
  int64_t B = 1, T = 1, H = 1, HV = 1, K = 1, V = 1;
  std::vector<int64_t> cu_seqlens;
  bool l2norm = false;
  bool has_initial_state = false;
  double scale = 1.0;
  std::vector<double> q, k, v, g, beta, h0;  // h0 empty when !has_initial_state

  int64_t num_seqs() const { return cu_seqlens.empty() ? B : int64_t(cu_seqlens.size()) - 1; }
};

struct Problem {
  ProblemSpec spec;
  RefProblem ref;
  HostTensor q, k, v, g, beta, h0, cu_seqlens;
  GatedDeltaRuleInputs inputs() const;
};

Problem make_problem(const ProblemSpec& spec);

// ---------------------------------------------------------------------------------------------
// Reference (double precision, token by token).

struct RefOutputs {
  std::vector<double> o;            // [B, T, HV, V]
  std::vector<double> final_state;  // [N, HV, K, V]
};
RefOutputs reference_forward(const RefProblem& p);

struct RefGrads {
  std::vector<double> dq, dk, dv, dg, dbeta, dh0;  // dh0 empty when !has_initial_state
};
// d_final_state may be null (zero).
RefGrads reference_backward(const RefProblem& p, const std::vector<double>& d_o,
                            const std::vector<double>* d_final_state);

// L = sum(w_o * o) + sum(w_s * final_state) (w_s may be null), accumulated in long double.
double reference_loss(const RefProblem& p, const std::vector<double>& w_o,
                      const std::vector<double>* w_s);

// ---------------------------------------------------------------------------------------------
// Running an op.

struct OpTable {
  const char* name;
  size_t (*forward_workspace_bytes)(const GatedDeltaRuleInputs&);
  size_t (*backward_workspace_bytes)(const GatedDeltaRuleInputs&);
  void (*forward)(const GatedDeltaRuleInputs&, const GatedDeltaRuleForwardOutputs&);
  void (*backward)(const GatedDeltaRuleInputs&, const GatedDeltaRuleBackwardInputs&,
                   const GatedDeltaRuleBackwardOutputs&);
};
extern const OpTable kChunkOp;
extern const OpTable kFusedRecurrentOp;

struct ForwardRun {
  HostTensor o, final_state, workspace;
};
// Outputs and workspace start poisoned (NaN / 0xFF).
ForwardRun run_forward(const OpTable& op, const Problem& p, bool final_state,
                       const Layout& o_layout = {});

struct BackwardRun {
  HostTensor dq, dk, dv, dg, dbeta, dh0, workspace;
};
// d_final_state may be null or absent. Gradients and workspace start poisoned.
BackwardRun run_backward(const OpTable& op, const Problem& p, const HostTensor& d_o,
                         const HostTensor* d_final_state, const Layout& grad_layout = {});

// ---------------------------------------------------------------------------------------------
// Comparisons.

struct Tolerance {
  double rel_l2;   // |got - ref|_2 / |ref|_2
  double rel_max;  // max |got - ref| / max |ref|
};
// Precision of a test run: the dtype of q/k/v and of g/beta.
enum class Precision { kF64, kF32, kBF16, kF16, kBF16GatesF32 };
const char* precision_name(Precision p);
void apply_precision(ProblemSpec& spec, Precision p);
Tolerance forward_tolerance(Precision p);
Tolerance backward_tolerance(Precision p);

// FLASHDELTA_TEST_VERBOSE set in the environment: every comparison prints its error sizes.
bool verbose();

// got and ref must be finite and close in both criteria. Errors are relative to ref's size, but
// never to less than `floor` per element: a gradient that is exactly 0 (dg of a first token
// without initial state) is computed by a chunked kernel as a sum of cancelling terms, and is
// held to the other gradients' scale (pass e.g. 1e-3 max|any gradient|), not to 0.
::testing::AssertionResult all_close(const std::string& what, const std::vector<double>& got,
                                     const std::vector<double>& ref, const Tolerance& tol,
                                     double floor = 0.0);

// Random weights of the finite-difference loss, rounded to `dtype`.
std::vector<double> random_weights(size_t n, Rng& rng, DType dtype);

// Gradient `name` of the loss with respect to the tensor `member` of p, by the 4-point central
// difference (-f(x+2h) + 8f(x+h) - 8f(x-h) + f(x-2h)) / 12h, on `max_samples` random elements
// (all when there are fewer). Returns (index, value) pairs.
struct FdSample {
  int64_t index;
  double value;
};
std::vector<FdSample> finite_differences(const RefProblem& p,
                                         std::vector<double> RefProblem::*member,
                                         const std::vector<double>& w_o,
                                         const std::vector<double>* w_s, int max_samples, Rng& rng,
                                         double h = 1e-3);

// analytic[i] against every FD sample: |a - fd| <= rtol * |fd| + atol_rel * scale, where scale
// is max|fd| and `grad_scale` (pass the largest gradient of any input, so that a gradient that
// is ~0 everywhere is held to the finite differences' noise floor, not to 0).
::testing::AssertionResult matches_fd(const std::string& what, const std::vector<double>& analytic,
                                      const std::vector<FdSample>& fd, double grad_scale,
                                      double rtol = 1e-6, double atol_rel = 1e-8);
// max |x| over all gradients.
double max_abs_gradient(const RefGrads& g);

// ---------------------------------------------------------------------------------------------
// Shared test bodies (called from test_chunk_... and test_fused_recurrent_...).

// Forward cases: T in {1, 63, 64, 65, 130, 200}, HV/H in {1, 2, 4}, K != V, varlen with empty and
// length-1 sequences, int32 and int64 cu_seqlens, with/without l2norm, initial/final state.
const std::vector<ProblemSpec>& forward_cases();
// Backward cases: small K, V; T up to 135 (several chunks); grouped heads; varlen.
const std::vector<ProblemSpec>& backward_cases();

// A random problem: batched (B in 1..3) or varlen (1..5 sequences of 0..80 tokens, int32 or
// int64 offsets), H in 1..3, HV/H in {1, 2, 4}, K in 8..64, V in 8..64, random flags, gate and
// scale. fd_samples is kept small.
ProblemSpec random_spec(uint64_t seed);

// Forward of `op` against reference_forward at `precision`.
void check_forward(const OpTable& op, ProblemSpec spec, Precision precision);
// Backward of `op` against reference_backward at `precision`; in float64 also against
// finite differences of the reference loss (on a random subset of each gradient).
void check_backward(const OpTable& op, ProblemSpec spec, Precision precision);
// Strided (non-contiguous) inputs, outputs and gradients give the contiguous results.
void check_strided(const OpTable& op);
// Forward + backward leave every input (and d_o, d_final_state) byte for byte unchanged, and
// two runs give bit-identical results.
void check_inputs_unchanged_and_deterministic(const OpTable& op, Precision precision);
// A NaN in v (or g, or q) gives NaN in o and the final state, and the call returns.
void check_nan_propagates(const OpTable& op);

// One line with everything needed to rebuild the problem (for failure messages).
std::string describe(const ProblemSpec& spec);

}  // namespace gdn_test
