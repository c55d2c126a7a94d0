// Argument validation of chunk_gated_delta_rule and fused_recurrent_gated_delta_rule: every bad
// input raises flashdelta::Error of the right kind (kValue -> ValueError, kType -> TypeError)
// whose message names the argument and says what was expected and what was given; and a call
// that raises has written nothing.
#include <functional>
#include <string>
#include <vector>

#include "gdn_reference.h"

namespace gdn_test {
namespace {

using flashdelta::Device;
using flashdelta::DeviceType;
using flashdelta::Error;
using Kind = flashdelta::Error::Kind;

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kValue: return "kValue";
    case Kind::kType: return "kType";
    case Kind::kNotImplemented: return "kNotImplemented";
    case Kind::kRuntime: return "kRuntime";
  }
  return "?";
}

// `call` must throw flashdelta::Error of `kind` whose message contains every one of `parts`.
::testing::AssertionResult raises(const std::function<void()>& call, Kind kind,
                                  const std::vector<std::string>& parts) {
  try {
    call();
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (e.kind() != kind) {
      return ::testing::AssertionFailure()
             << "raised " << kind_name(e.kind()) << ", expected " << kind_name(kind) << ": " << msg;
    }
    for (const std::string& part : parts) {
      if (msg.find(part) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "message \"" << msg << "\" does not contain \"" << part << "\"";
      }
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "raised a non-flashdelta exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not raise";
}

// A valid problem (B = 2, T = 5, H = 2, HV = 4, K = 8, V = 6, f32, with states) and valid
// outputs for both ops; each test breaks one thing.
class GatedDeltaRuleChecks : public ::testing::Test {
 protected:
  static constexpr int64_t B = 2, T = 5, H = 2, HV = 4, K = 8, V = 6;

  void SetUp() override { build(base_spec()); }

  static ProblemSpec base_spec() {
    ProblemSpec s;
    s.B = B, s.T = T, s.H = H, s.HV = HV, s.K = K, s.V = V;
    s.dtype = DType::kFloat32;
    s.initial_state = s.final_state = true;
    return s;
  }

  static ProblemSpec varlen_spec() {
    ProblemSpec s = base_spec();
    s.B = 1;
    s.cu_seqlens = {0, 2, 5};
    return s;
  }

  void build(const ProblemSpec& s) {
    p = make_problem(s);
    in = p.inputs();
    const int64_t N = s.num_seqs();
    const DType sd = s.state_dtype();
    o = HostTensor(s.dtype, {s.B, s.T, s.HV, s.V});
    fs = HostTensor(sd, {N, s.HV, s.K, s.V});
    d_o = HostTensor::from_values(s.dtype, {s.B, s.T, s.HV, s.V},
                                  std::vector<double>(size_t(s.B * s.T * s.HV * s.V), 1.0));
    d_fs = HostTensor::from_values(sd, {N, s.HV, s.K, s.V},
                                   std::vector<double>(size_t(N * s.HV * s.K * s.V), 1.0));
    dq = HostTensor(s.dtype, {s.B, s.T, s.H, s.K});
    dk = HostTensor(s.dtype, {s.B, s.T, s.H, s.K});
    dv = HostTensor(s.dtype, {s.B, s.T, s.HV, s.V});
    dg = HostTensor(s.gates_dtype(), {s.B, s.T, s.HV});
    dbeta = HostTensor(s.gates_dtype(), {s.B, s.T, s.HV});
    dh0 = HostTensor(sd, {N, s.HV, s.K, s.V});
    size_t bytes = 1;
    for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
      bytes = std::max({bytes, op->forward_workspace_bytes(in), op->backward_workspace_bytes(in)});
    }
    ws = HostTensor(DType::kUInt8, {int64_t(bytes)});
    out = {o.ref(), fs.ref(), ws.ref()};
    gin = {d_o.ref(), d_fs.ref()};
    gout = {dq.ref(), dk.ref(), dv.ref(), dg.ref(), dbeta.ref(), dh0.ref(), ws.ref()};
  }

  // Nothing was written to the outputs (they are still poisoned).
  bool outputs_untouched() const {
    for (const HostTensor* t : {&o, &fs, &dq, &dk, &dv, &dg, &dbeta, &dh0}) {
      for (unsigned char b : t->bytes()) {
        if (b != 0xFF) return false;
      }
    }
    return true;
  }

  // A bad input: every entry point of both ops (workspace queries, forward, backward) raises.
  void expect_input_error(Kind kind, const std::vector<std::string>& parts) {
    for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
      SCOPED_TRACE(op->name);
      EXPECT_TRUE(raises([&] { op->forward_workspace_bytes(in); }, kind, parts));
      EXPECT_TRUE(raises([&] { op->backward_workspace_bytes(in); }, kind, parts));
      EXPECT_TRUE(raises([&] { op->forward(in, out); }, kind, parts));
      EXPECT_TRUE(raises([&] { op->backward(in, gin, gout); }, kind, parts));
    }
    EXPECT_TRUE(outputs_untouched());
  }
  void expect_forward_error(Kind kind, const std::vector<std::string>& parts) {
    for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
      SCOPED_TRACE(op->name);
      EXPECT_TRUE(raises([&] { op->forward(in, out); }, kind, parts));
    }
    EXPECT_TRUE(outputs_untouched());
  }
  void expect_backward_error(Kind kind, const std::vector<std::string>& parts) {
    for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
      SCOPED_TRACE(op->name);
      EXPECT_TRUE(raises([&] { op->backward(in, gin, gout); }, kind, parts));
    }
    EXPECT_TRUE(outputs_untouched());
  }

  Problem p;
  GatedDeltaRuleInputs in;
  HostTensor o, fs, d_o, d_fs, dq, dk, dv, dg, dbeta, dh0, ws;
  GatedDeltaRuleForwardOutputs out;
  GatedDeltaRuleBackwardInputs gin;
  GatedDeltaRuleBackwardOutputs gout;
};

TEST_F(GatedDeltaRuleChecks, ValidArgumentsPass) {
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    SCOPED_TRACE(op->name);
    EXPECT_NO_THROW(op->forward(in, out));
    EXPECT_NO_THROW(op->backward(in, gin, gout));
  }
  build(varlen_spec());
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    SCOPED_TRACE(op->name);
    EXPECT_NO_THROW(op->forward(in, out));
    EXPECT_NO_THROW(op->backward(in, gin, gout));
  }
}

// --- ranks and presence ---------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, QWrongRank) {
  in.q.rank = 3;
  expect_input_error(Kind::kValue,
                     {"q must have 4 dimensions", "[B, T, H, K]", "got 3", "[2, 5, 2]"});
}

TEST_F(GatedDeltaRuleChecks, KWrongRank) {
  in.k.rank = 5;
  in.k.shape[4] = 1;
  in.k.strides[4] = 1;
  expect_input_error(Kind::kValue, {"k must have 4 dimensions", "got 5"});
}

TEST_F(GatedDeltaRuleChecks, VWrongRank) {
  in.v.rank = 3;
  expect_input_error(Kind::kValue, {"v must have 4 dimensions", "[B, T, HV, V]"});
}

TEST_F(GatedDeltaRuleChecks, GWrongRank) {
  in.g.rank = 4;
  in.g.shape[3] = 1;
  expect_input_error(Kind::kValue, {"g must have 3 dimensions", "[B, T, HV]", "[2, 5, 4, 1]"});
}

TEST_F(GatedDeltaRuleChecks, BetaWrongRank) {
  in.beta.rank = 2;
  expect_input_error(Kind::kValue, {"beta must have 3 dimensions", "[B, T, HV]"});
}

TEST_F(GatedDeltaRuleChecks, MissingQ) {
  in.q = TensorRef{};
  expect_input_error(Kind::kValue, {"q is required"});
}

TEST_F(GatedDeltaRuleChecks, MissingBeta) {
  in.beta = TensorRef{};
  expect_input_error(Kind::kValue, {"beta is required"});
}

// --- mismatched sizes -----------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, KMismatchedT) {
  in.k.shape[1] = T - 1;
  expect_input_error(Kind::kValue, {"k must have shape", "[2, 5, 2, 8]", "got [2, 4, 2, 8]"});
}

TEST_F(GatedDeltaRuleChecks, KMismatchedHeads) {
  in.k.shape[2] = 1;
  expect_input_error(Kind::kValue, {"k must have shape", "[2, 5, 2, 8]", "got [2, 5, 1, 8]"});
}

TEST_F(GatedDeltaRuleChecks, KMismatchedHeadDim) {
  in.k.shape[3] = 4;
  expect_input_error(Kind::kValue, {"k must have shape", "got [2, 5, 2, 4]"});
}

TEST_F(GatedDeltaRuleChecks, KMismatchedBatch) {
  in.k.shape[0] = 1;
  expect_input_error(Kind::kValue, {"k must have shape", "got [1, 5, 2, 8]"});
}

TEST_F(GatedDeltaRuleChecks, VMismatchedBatch) {
  in.v.shape[0] = 1;
  expect_input_error(Kind::kValue, {"v must have shape", "B = 2", "got [1, 5, 4, 6]"});
}

TEST_F(GatedDeltaRuleChecks, VMismatchedT) {
  in.v.shape[1] = 4;
  expect_input_error(Kind::kValue, {"v must have shape", "T = 5", "got [2, 4, 4, 6]"});
}

TEST_F(GatedDeltaRuleChecks, HVNotAMultipleOfH) {
  in.v.shape[2] = 3;
  expect_input_error(Kind::kValue, {"HV", "v.shape[2] = 3", "multiple", "q.shape[2] = 2"});
}

TEST_F(GatedDeltaRuleChecks, GMismatchedHeads) {
  in.g.shape[2] = 2;
  expect_input_error(Kind::kValue, {"g must have shape", "[2, 5, 4]", "got [2, 5, 2]"});
}

TEST_F(GatedDeltaRuleChecks, BetaMismatchedT) {
  in.beta.shape[1] = 4;
  expect_input_error(Kind::kValue, {"beta must have shape", "[2, 5, 4]", "got [2, 4, 4]"});
}

TEST_F(GatedDeltaRuleChecks, ZeroHeads) {
  in.q.shape[2] = 0;
  in.k.shape[2] = 0;
  expect_input_error(Kind::kValue, {"q must have at least one head"});
}

// --- initial_state --------------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, InitialStateWrongShape) {
  in.initial_state.shape[3] = V + 1;
  expect_input_error(Kind::kValue, {"initial_state must have shape", "[N, HV, K, V]",
                                    "[2, 4, 8, 6]", "got [2, 4, 8, 7]"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateWrongNumberOfSequences) {
  in.initial_state.shape[0] = 1;
  expect_input_error(Kind::kValue, {"initial_state must have shape", "got [1, 4, 8, 6]"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateWrongRank) {
  in.initial_state.rank = 3;
  expect_input_error(Kind::kValue, {"initial_state must have shape"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateHalfPrecision) {
  in.initial_state.dtype = DType::kBFloat16;
  expect_input_error(Kind::kType, {"initial_state must have dtype", "float32", "got bfloat16"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateFloat64WithFloat32Inputs) {
  in.initial_state.dtype = DType::kFloat64;
  expect_input_error(Kind::kType, {"initial_state", "float32", "got float64"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateFloat32WithFloat64Inputs) {
  ProblemSpec s = base_spec();
  s.dtype = DType::kFloat64;
  build(s);
  in.initial_state.dtype = DType::kFloat32;
  expect_input_error(Kind::kType, {"initial_state", "float64", "got float32"});
}

// --- dtypes ---------------------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, MixedQKDtypes) {
  in.k.dtype = DType::kBFloat16;
  expect_input_error(Kind::kType, {"k must have the dtype of q", "float32", "got bfloat16"});
}

TEST_F(GatedDeltaRuleChecks, MixedQVDtypes) {
  in.v.dtype = DType::kFloat16;
  expect_input_error(Kind::kType, {"v must have the dtype of q", "float32", "got float16"});
}

TEST_F(GatedDeltaRuleChecks, IntegerQ) {
  in.q.dtype = DType::kInt32;
  in.k.dtype = DType::kInt32;
  in.v.dtype = DType::kInt32;
  expect_input_error(Kind::kType, {"q must have dtype in", "got int32"});
}

TEST_F(GatedDeltaRuleChecks, IntegerG) {
  in.g.dtype = DType::kInt64;
  expect_input_error(Kind::kType, {"g must have dtype in", "got int64"});
}

TEST_F(GatedDeltaRuleChecks, Float64BetaWithFloat32Inputs) {
  in.beta.dtype = DType::kFloat64;
  expect_input_error(Kind::kType, {"beta", "got float64"});
}

TEST_F(GatedDeltaRuleChecks, Float32GWithFloat64Inputs) {
  ProblemSpec s = base_spec();
  s.dtype = DType::kFloat64;
  build(s);
  in.g.dtype = DType::kFloat32;
  expect_input_error(Kind::kType, {"g must have the dtype of q", "float64", "got float32"});
}

// --- devices --------------------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, TensorOnAnotherDevice) {
  in.v.device = Device{DeviceType::kCUDA, 0};
  expect_input_error(Kind::kValue, {"v is on cuda", "q is on cpu"});
}

TEST_F(GatedDeltaRuleChecks, InitialStateOnAnotherDevice) {
  in.initial_state.device = Device{DeviceType::kCUDA, 0};
  expect_input_error(Kind::kValue, {"initial_state is on cuda"});
}

// --- cu_seqlens -----------------------------------------------------------------------------

class GatedDeltaRuleVarlenChecks : public GatedDeltaRuleChecks {
 protected:
  void SetUp() override { build(varlen_spec()); }
  // Replaces the offsets (same count) in place, in the buffer's dtype.
  void set_offsets(const std::vector<double>& offsets) { p.cu_seqlens.set_values(offsets); }
};

TEST_F(GatedDeltaRuleVarlenChecks, NotStartingAtZero) {
  set_offsets({1, 2, 5});
  expect_input_error(Kind::kValue, {"cu_seqlens must start at 0", "got 1"});
}

TEST_F(GatedDeltaRuleVarlenChecks, Decreasing) {
  set_offsets({0, 4, 3});
  in.cu_seqlens.shape[0] = 3;
  expect_input_error(Kind::kValue, {"cu_seqlens must be non-decreasing", "cu_seqlens[1] = 4",
                                    "cu_seqlens[2] = 3"});
}

TEST_F(GatedDeltaRuleVarlenChecks, NotEndingAtT) {
  set_offsets({0, 2, 4});
  expect_input_error(Kind::kValue, {"cu_seqlens must end at T = 5", "got 4"});
}

TEST_F(GatedDeltaRuleVarlenChecks, EndingBeyondT) {
  set_offsets({0, 2, 6});
  expect_input_error(Kind::kValue, {"cu_seqlens must end at T = 5", "got 6"});
}

TEST_F(GatedDeltaRuleVarlenChecks, Int32Offsets) {
  ProblemSpec s = varlen_spec();
  s.cu_dtype = DType::kInt32;
  build(s);
  set_offsets({0, 3, 2});
  expect_input_error(Kind::kValue, {"cu_seqlens must be non-decreasing", "cu_seqlens[2] = 2"});
  set_offsets({0, 2, 5});
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    EXPECT_NO_THROW(op->forward(in, out)) << op->name;
  }
}

TEST_F(GatedDeltaRuleVarlenChecks, WithBatchAboveOne) {
  // cu_seqlens with the batched (B = 2) problem.
  const HostTensor cu = HostTensor::from_values(DType::kInt64, {3}, {0, 2, 5});
  build(base_spec());
  in.cu_seqlens = cu.ref();
  expect_input_error(Kind::kValue, {"cu_seqlens needs B = 1", "got B = 2"});
}

TEST_F(GatedDeltaRuleVarlenChecks, FloatOffsets) {
  in.cu_seqlens.dtype = DType::kFloat32;
  expect_input_error(Kind::kType,
                     {"cu_seqlens must have dtype in", "int32", "int64", "got float32"});
}

TEST_F(GatedDeltaRuleVarlenChecks, WrongRank) {
  in.cu_seqlens.rank = 2;
  in.cu_seqlens.shape[1] = 1;
  expect_input_error(Kind::kValue, {"cu_seqlens must have 1 dimensions", "got 2"});
}

TEST_F(GatedDeltaRuleVarlenChecks, SingleOffset) {
  in.cu_seqlens.shape[0] = 1;
  expect_input_error(Kind::kValue, {"cu_seqlens must hold at least 2 offsets"});
}

TEST_F(GatedDeltaRuleVarlenChecks, InitialStateNotPerSequence) {
  // N = 2 sequences but an initial_state for 1.
  in.initial_state.shape[0] = 1;
  expect_input_error(Kind::kValue,
                     {"initial_state must have shape", "[2, 4, 8, 6]", "got [1, 4, 8, 6]"});
}

TEST_F(GatedDeltaRuleVarlenChecks, NonContiguousOffsets) {
  const HostTensor cu = HostTensor::from_values(DType::kInt64, {5}, {0, 9, 2, 9, 5});
  in.cu_seqlens = cu.ref();
  in.cu_seqlens.shape[0] = 3;
  in.cu_seqlens.strides[0] = 2;
  expect_input_error(Kind::kValue, {"cu_seqlens must be contiguous"});
}

// --- scale ----------------------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, InfiniteScale) {
  in.scale = std::numeric_limits<double>::infinity();
  expect_input_error(Kind::kValue, {"scale must be finite"});
}

// --- outputs and workspace ------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, OutputWrongShape) {
  out.o.shape[3] = V + 1;
  expect_forward_error(Kind::kValue, {"o must have shape", "[2, 5, 4, 6]", "got [2, 5, 4, 7]"});
}

TEST_F(GatedDeltaRuleChecks, OutputWrongDtype) {
  out.o.dtype = DType::kBFloat16;
  expect_forward_error(Kind::kType, {"o must have the dtype of q", "float32", "got bfloat16"});
}

TEST_F(GatedDeltaRuleChecks, OutputMissing) {
  out.o = TensorRef{};
  expect_forward_error(Kind::kValue, {"o is required"});
}

TEST_F(GatedDeltaRuleChecks, FinalStateWrongShape) {
  out.final_state.shape[2] = K - 1;
  expect_forward_error(Kind::kValue,
                       {"final_state must have shape", "[2, 4, 8, 6]", "got [2, 4, 7, 6]"});
}

TEST_F(GatedDeltaRuleChecks, FinalStateWrongDtype) {
  out.final_state.dtype = DType::kFloat16;
  expect_forward_error(Kind::kType, {"final_state must have dtype", "got float16"});
}

TEST_F(GatedDeltaRuleChecks, ForwardWorkspaceTooSmall) {
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    SCOPED_TRACE(op->name);
    const size_t bytes = op->forward_workspace_bytes(in);
    if (bytes == 0) continue;  // nothing to be too small
    GatedDeltaRuleForwardOutputs small = out;
    small.workspace.shape[0] = int64_t(bytes) - 1;
    EXPECT_TRUE(raises([&] { op->forward(in, small); }, Kind::kValue,
                       {"workspace must hold at least " + std::to_string(bytes) + " bytes",
                        "got " + std::to_string(bytes - 1)}));
    small.workspace = TensorRef{};
    EXPECT_TRUE(raises([&] { op->forward(in, small); }, Kind::kValue, {"workspace"}));
  }
  EXPECT_TRUE(outputs_untouched());
}

TEST_F(GatedDeltaRuleChecks, BackwardWorkspaceTooSmall) {
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    SCOPED_TRACE(op->name);
    const size_t bytes = op->backward_workspace_bytes(in);
    if (bytes == 0) continue;
    GatedDeltaRuleBackwardOutputs small = gout;
    small.workspace.shape[0] = int64_t(bytes) - 1;
    EXPECT_TRUE(raises([&] { op->backward(in, gin, small); }, Kind::kValue,
                       {"workspace must hold at least " + std::to_string(bytes) + " bytes"}));
  }
  EXPECT_TRUE(outputs_untouched());
}

TEST_F(GatedDeltaRuleChecks, WorkspaceWrongDtype) {
  ws = HostTensor(DType::kFloat32, {int64_t(ws.numel())});
  out.workspace = ws.ref();
  gout.workspace = ws.ref();
  for (const OpTable* op : {&kChunkOp, &kFusedRecurrentOp}) {
    SCOPED_TRACE(op->name);
    if (op->forward_workspace_bytes(in) > 0) {
      EXPECT_TRUE(raises([&] { op->forward(in, out); }, Kind::kType,
                         {"workspace must be a contiguous 1-d uint8 tensor", "got float32"}));
    }
    if (op->backward_workspace_bytes(in) > 0) {
      EXPECT_TRUE(raises([&] { op->backward(in, gin, gout); }, Kind::kType, {"workspace"}));
    }
  }
}

// The CPU chunked forward keeps its chunk states for the backward when given `saved` (fp32
// [slots, HV, K, V]: 2 slots here), and the backward given them needs that much less workspace;
// the recurrent op keeps nothing. A `saved` too small is an error naming it.
TEST_F(GatedDeltaRuleChecks, KeptStatesSizesOnTheCpu) {
  const size_t kept = size_t(2 * HV * K * V) * sizeof(float);
  EXPECT_EQ(flashdelta::chunk_gated_delta_rule_saved_bytes(in), kept);
  EXPECT_EQ(flashdelta::fused_recurrent_gated_delta_rule_saved_bytes(in), 0u);
  EXPECT_EQ(flashdelta::chunk_gated_delta_rule_backward_workspace_bytes(in, true),
            flashdelta::chunk_gated_delta_rule_backward_workspace_bytes(in, false) - kept);
  EXPECT_EQ(flashdelta::fused_recurrent_gated_delta_rule_backward_workspace_bytes(in, true),
            flashdelta::fused_recurrent_gated_delta_rule_backward_workspace_bytes(in, false));
  HostTensor small(DType::kUInt8, {int64_t(kept) - 1});
  GatedDeltaRuleForwardOutputs with_small = out;
  with_small.saved = small.ref();
  EXPECT_TRUE(raises([&] { kChunkOp.forward(in, with_small); }, Kind::kValue,
                     {"saved must hold at least " + std::to_string(kept) + " bytes"}));
  GatedDeltaRuleBackwardInputs gin_small = gin;
  gin_small.saved = small.ref();
  EXPECT_TRUE(raises([&] { kChunkOp.backward(in, gin_small, gout); }, Kind::kValue,
                     {"saved must hold at least"}));
  // the recurrent op ignores a `saved` (it keeps nothing)
  GatedDeltaRuleForwardOutputs with_saved = out;
  with_saved.saved = small.ref();
  EXPECT_NO_THROW(kFusedRecurrentOp.forward(in, with_saved));
}

// --- backward arguments ---------------------------------------------------------------------

TEST_F(GatedDeltaRuleChecks, MissingDInitialState) {
  gout.d_initial_state = TensorRef{};
  expect_backward_error(Kind::kValue,
                        {"d_initial_state must be given exactly when initial_state is"});
}

TEST_F(GatedDeltaRuleChecks, DInitialStateWithoutInitialState) {
  in.initial_state = TensorRef{};
  expect_backward_error(Kind::kValue,
                        {"d_initial_state must be given exactly when initial_state is"});
}

TEST_F(GatedDeltaRuleChecks, DInitialStateWrongShape) {
  gout.d_initial_state.shape[1] = HV - 1;
  expect_backward_error(Kind::kValue, {"d_initial_state must have shape", "got [2, 3, 8, 6]"});
}

TEST_F(GatedDeltaRuleChecks, DInitialStateWrongDtype) {
  gout.d_initial_state.dtype = DType::kFloat64;
  expect_backward_error(Kind::kType, {"d_initial_state must have dtype", "got float64"});
}

TEST_F(GatedDeltaRuleChecks, DOWrongShape) {
  gin.d_o.shape[2] = HV / 2;
  expect_backward_error(Kind::kValue, {"d_o must have shape", "[2, 5, 4, 6]", "got [2, 5, 2, 6]"});
}

TEST_F(GatedDeltaRuleChecks, DOMissing) {
  gin.d_o = TensorRef{};
  expect_backward_error(Kind::kValue, {"d_o is required"});
}

TEST_F(GatedDeltaRuleChecks, DFinalStateWrongShape) {
  gin.d_final_state.shape[3] = V - 1;
  expect_backward_error(Kind::kValue, {"d_final_state must have shape", "got [2, 4, 8, 5]"});
}

TEST_F(GatedDeltaRuleChecks, DFinalStateWrongDtype) {
  gin.d_final_state.dtype = DType::kBFloat16;
  expect_backward_error(Kind::kType, {"d_final_state must have dtype", "got bfloat16"});
}

TEST_F(GatedDeltaRuleChecks, GradientWrongShape) {
  gout.dq.shape[1] = T - 1;
  expect_backward_error(
      Kind::kValue, {"dq must have the shape of its input", "[2, 5, 2, 8]", "got [2, 4, 2, 8]"});
}

TEST_F(GatedDeltaRuleChecks, GradientWrongRank) {
  gout.dbeta.rank = 2;
  expect_backward_error(Kind::kValue, {"dbeta must have the shape of its input"});
}

TEST_F(GatedDeltaRuleChecks, GradientWrongDtype) {
  gout.dg.dtype = DType::kBFloat16;
  expect_backward_error(Kind::kType, {"dg must have the dtype of its input", "got bfloat16"});
}

TEST_F(GatedDeltaRuleChecks, GradientMissing) {
  gout.dv = TensorRef{};
  expect_backward_error(Kind::kValue, {"dv is required"});
}

TEST_F(GatedDeltaRuleChecks, GradientOnAnotherDevice) {
  gout.dk.device = Device{DeviceType::kCUDA, 0};
  expect_backward_error(Kind::kValue, {"dk is on cuda"});
}

}  // namespace
}  // namespace gdn_test
