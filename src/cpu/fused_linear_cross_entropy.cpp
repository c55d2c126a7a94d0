// fused_linear_cross_entropy on the CPU.
//
// What: the causal-LM loss head of include/flashdelta/fused_linear_cross_entropy.h (loss sum,
// count of valid tokens, and the gradients of the sum w.r.t. hidden and weight) without holding
// the [N, V] logits.
//
// Algorithm: the weight is widened to fp32 once per call (workspace; used in place when it is
// fp32). Then per chunk of `chunk_rows` tokens, with the register-tiled GEMM of cpu/gemm.h:
//   1. the chunk's hidden rows are widened to fp32 ([C, H]);
//   2. logits Z = X W^T, one task per block of kVocabBlock vocabulary entries (each task packs
//      its block of W^T into its worker's slice of the workspace);
//   3. one task per token: each logit rounded to the inputs' dtype (what F.linear returns and
//      transformers' loss upcasts), then max, sum of exp and logsumexp in double, the token's
//      loss, and in place of Z the logit gradient D = softmax(z) - onehot(t), rounded to the
//      inputs' dtype as autograd rounds it on its way back into the bf16 linear. Ignored tokens:
//      loss 0, gradient row 0;
//   4. d_hidden_sum rows = D W, one task per block of kRowBlock tokens;
//   5. when the weight is trained, one task per vocabulary block: the fp32 accumulator of
//      d_weight_sum (the output itself for fp32 weights, else the workspace) += D^T X.
// Every output element is written by one task in a fixed order, so results do not depend on the
// thread count or schedule. The loss sum adds the per-token losses in token order (double).
//
// Assumes: validated inputs (src/core), hidden with unit stride along H, weight contiguous.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "core/check.h"
#include "core/fused_linear_cross_entropy_backend.h"
#include "cpu/convert.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {
namespace {

using flashdelta::cpu::bf16;
using flashdelta::cpu::f16;
using flashdelta::cpu::from_float;
using flashdelta::cpu::gemm;
using flashdelta::cpu::Mat;
using flashdelta::cpu::num_threads;
using flashdelta::cpu::parallel_for;
using flashdelta::cpu::to_float;

constexpr int64_t kVocabBlock = 256;  // vocabulary entries per task (logits, d_weight)
constexpr int64_t kRowBlock = 16;     // tokens per task (d_hidden)
constexpr int64_t kConvertBlock = int64_t{1} << 16;  // elements per task of a conversion

// Rounds an fp32 value to storage type T and back (identity for float).
template <typename T>
inline float round_to(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return to_float(from_float<T>(x));
  }
}

int64_t target_at(const TensorRef& target, int64_t i) {
  const int64_t offset = i * target.stride(0);
  return target.dtype == DType::kInt64 ? static_cast<const int64_t*>(target.data)[offset]
                                       : static_cast<const int32_t*>(target.data)[offset];
}

bool widens_weight(const FusedLinearCrossEntropyInputs& in) {
  return in.weight.dtype != DType::kFloat32;
}

struct Workspace {
  float* weight_f32;  // [V, H] when the weight is not fp32, else nullptr
  float* dw_acc;      // [V, H] when the weight is trained and not fp32, else nullptr
  float* logits;      // [C, V]
  float* xf;          // [C, H]
  float* row_loss;    // [N]
  float* pack;        // [workers, H, kVocabBlock]: each task's block of W^T
};

Workspace carve(const FusedLinearCrossEntropyShape& s, const FusedLinearCrossEntropyInputs& in,
                void* base) {
  float* p = static_cast<float*>(base);
  const int64_t vh = s.vocab_size * s.hidden_size;
  Workspace w{};
  if (widens_weight(in)) {
    w.weight_f32 = p;
    p += vh;
    if (in.weight_grad) {
      w.dw_acc = p;
      p += vh;
    }
  }
  w.logits = p;
  p += s.chunk_rows * s.vocab_size;
  w.xf = p;
  p += s.chunk_rows * s.hidden_size;
  w.row_loss = p;
  p += s.num_tokens;
  w.pack = p;
  return w;
}

int64_t workspace_floats(const FusedLinearCrossEntropyShape& s,
                         const FusedLinearCrossEntropyInputs& in) {
  const int64_t vh = s.vocab_size * s.hidden_size;
  return (widens_weight(in) ? vh * (in.weight_grad ? 2 : 1) : 0) + s.chunk_rows * s.vocab_size +
         s.chunk_rows * s.hidden_size + s.num_tokens +
         int64_t{num_threads()} * s.hidden_size * kVocabBlock;
}

template <typename T>
void forward_impl(const FusedLinearCrossEntropyShape& s, const FusedLinearCrossEntropyInputs& in,
                  const FusedLinearCrossEntropyForwardOutputs& out) {
  const int64_t n = s.num_tokens, h = s.hidden_size, v = s.vocab_size;
  const T* hidden = static_cast<const T*>(in.hidden.data);
  const int64_t hidden_ld = std::max(in.hidden.stride(0), h);  // one row may carry any stride
  float* d_hidden = static_cast<float*>(out.d_hidden_sum.data);
  float* loss_sum_out = static_cast<float*>(out.loss_sum.data);
  float* num_valid_out = static_cast<float*>(out.num_valid.data);

  int64_t num_valid = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = target_at(in.target, i);
    if (t == in.ignore_index) continue;
    check_value(t >= 0 && t < v, "fused_linear_cross_entropy: target[", i, "] = ", t,
                " is outside [0, V) = [0, ", v, ") and is not ignore_index (", in.ignore_index,
                ")");
    ++num_valid;
  }
  if (n == 0) {  // nothing to add up: zero sums and a zero weight gradient
    loss_sum_out[0] = 0.0f;
    num_valid_out[0] = 0.0f;
    if (in.weight_grad) {
      std::memset(out.d_weight_sum.data, 0, dtype_size(in.weight.dtype) * size_t(v * h));
    }
    return;
  }
  const Workspace ws = carve(s, in, out.workspace.data);

  // The weight in fp32, [V, H].
  const float* weight = static_cast<const float*>(in.weight.data);
  if (ws.weight_f32) {
    const T* src = static_cast<const T*>(in.weight.data);
    parallel_for((v * h + kConvertBlock - 1) / kConvertBlock, [&](int64_t task, int) {
      const int64_t end = std::min(v * h, (task + 1) * kConvertBlock);
      for (int64_t e = task * kConvertBlock; e < end; ++e) ws.weight_f32[e] = to_float(src[e]);
    });
    weight = ws.weight_f32;
  }
  float* dw = nullptr;
  if (in.weight_grad) {
    dw = ws.dw_acc ? ws.dw_acc : static_cast<float*>(out.d_weight_sum.data);
    std::memset(dw, 0, sizeof(float) * static_cast<size_t>(v * h));
  }
  const int64_t vocab_blocks = (v + kVocabBlock - 1) / kVocabBlock;

  for (int64_t c0 = 0; c0 < n; c0 += s.chunk_rows) {
    const int64_t rows = std::min(s.chunk_rows, n - c0);
    for (int64_t i = 0; i < rows; ++i) {
      const T* x = hidden + (c0 + i) * hidden_ld;
      float* xf = ws.xf + i * h;
      for (int64_t k = 0; k < h; ++k) xf[k] = to_float(x[k]);
    }
    const Mat<float> x_chunk(ws.xf, rows, h);

    // 2. Z[:, block] = X W[block]^T
    parallel_for(vocab_blocks, [&](int64_t task, int worker) {
      const int64_t j0 = task * kVocabBlock, vb = std::min(kVocabBlock, v - j0);
      const Mat<float> z_block(ws.logits + j0, rows, vb, v);
      const Mat<float> w_block(const_cast<float*>(weight) + j0 * h, vb, h);
      gemm(z_block, x_chunk, w_block.t(), 1.0f, false,
           ws.pack + int64_t{worker} * h * kVocabBlock);
    });

    // 3. loss and logit gradient of each token, in place
    parallel_for(rows, [&](int64_t i, int) {
      const int64_t t = target_at(in.target, c0 + i);
      float* z = ws.logits + i * v;
      if (t == in.ignore_index) {
        ws.row_loss[c0 + i] = 0.0f;
        std::fill(z, z + v, 0.0f);
        return;
      }
      float z_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < v; ++j) {
        z[j] = round_to<T>(z[j]);
        z_max = std::max(z_max, z[j]);
      }
      double sum_exp = 0.0;
      for (int64_t j = 0; j < v; ++j) sum_exp += std::exp(static_cast<double>(z[j]) - z_max);
      const double lse = z_max + std::log(sum_exp);
      ws.row_loss[c0 + i] = static_cast<float>(lse - z[t]);
      for (int64_t j = 0; j < v; ++j) {
        const double p = std::exp(static_cast<double>(z[j]) - lse);
        z[j] = round_to<T>(static_cast<float>(p - (j == t ? 1.0 : 0.0)));
      }
    });

    // 4. d_hidden_sum rows = D W
    parallel_for((rows + kRowBlock - 1) / kRowBlock, [&](int64_t task, int) {
      const int64_t i0 = task * kRowBlock, rb = std::min(kRowBlock, rows - i0);
      gemm(Mat<float>(d_hidden + (c0 + i0) * h, rb, h), Mat<float>(ws.logits + i0 * v, rb, v),
           Mat<float>(const_cast<float*>(weight), v, h), 1.0f, false, static_cast<float*>(nullptr));
    });

    // 5. d_weight_sum[block] += D[:, block]^T X
    if (dw) {
      parallel_for(vocab_blocks, [&](int64_t task, int) {
        const int64_t j0 = task * kVocabBlock, vb = std::min(kVocabBlock, v - j0);
        const Mat<float> d_block(ws.logits + j0, rows, vb, v);
        gemm(Mat<float>(dw + j0 * h, vb, h), d_block.t(), x_chunk, 1.0f, true,
             static_cast<float*>(nullptr));
      });
    }
  }

  if (ws.dw_acc) {
    T* dst = static_cast<T*>(out.d_weight_sum.data);
    parallel_for((v * h + kConvertBlock - 1) / kConvertBlock, [&](int64_t task, int) {
      const int64_t end = std::min(v * h, (task + 1) * kConvertBlock);
      for (int64_t e = task * kConvertBlock; e < end; ++e) dst[e] = from_float<T>(ws.dw_acc[e]);
    });
  }

  double loss_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) loss_sum += ws.row_loss[i];
  loss_sum_out[0] = static_cast<float>(loss_sum);
  num_valid_out[0] = static_cast<float>(num_valid);
}

// dst = scale * src, except that a zero stays zero whatever the scale: the stored gradients are
// exactly zero where a token was ignored, and torch's cross-entropy sets those gradients to 0
// rather than multiplying (so an all-ignored mean, scale 1/0, gives zeros as torch does, not NaN).
template <typename T>
void scale_from_f32(const float* src, float scale, T* dst, int64_t count) {
  constexpr int64_t kBlock = kConvertBlock;
  parallel_for((count + kBlock - 1) / kBlock, [&](int64_t task, int) {
    const int64_t end = std::min(count, (task + 1) * kBlock);
    for (int64_t e = task * kBlock; e < end; ++e) {
      dst[e] = from_float<T>(src[e] == 0.0f ? 0.0f : scale * src[e]);
    }
  });
}

template <typename T>
void scale_same_dtype(const T* src, float scale, T* dst, int64_t count) {
  constexpr int64_t kBlock = kConvertBlock;
  parallel_for((count + kBlock - 1) / kBlock, [&](int64_t task, int) {
    const int64_t end = std::min(count, (task + 1) * kBlock);
    for (int64_t e = task * kBlock; e < end; ++e) {
      const float x = to_float(src[e]);
      dst[e] = from_float<T>(x == 0.0f ? 0.0f : scale * x);
    }
  });
}

template <typename Fn>
void with_float_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kBFloat16: fn(bf16{}); break;
    case DType::kFloat16: fn(f16{}); break;
    default:
      fail(Error::Kind::kType, "fused_linear_cross_entropy: unsupported dtype ",
           dtype_name(dtype));
  }
}

}  // namespace

size_t fused_linear_cross_entropy_workspace_bytes(const FusedLinearCrossEntropyShape& s,
                                                  const FusedLinearCrossEntropyInputs& in) {
  if (s.num_tokens == 0) return 0;
  return sizeof(float) * static_cast<size_t>(workspace_floats(s, in));
}

void fused_linear_cross_entropy_forward(const FusedLinearCrossEntropyShape& s,
                                        const FusedLinearCrossEntropyInputs& in,
                                        const FusedLinearCrossEntropyForwardOutputs& out) {
  with_float_type(in.hidden.dtype, [&](auto tag) { forward_impl<decltype(tag)>(s, in, out); });
}

void fused_linear_cross_entropy_backward(const FusedLinearCrossEntropyBackwardArgs& a) {
  const float scale = static_cast<const float*>(a.grad_scale.data)[0];
  with_float_type(a.d_hidden.dtype, [&](auto tag) {
    using T = decltype(tag);
    scale_from_f32(static_cast<const float*>(a.d_hidden_sum.data), scale,
                   static_cast<T*>(a.d_hidden.data), a.d_hidden.numel());
  });
  if (a.d_weight_sum.defined()) {
    with_float_type(a.d_weight_sum.dtype, [&](auto tag) {
      using T = decltype(tag);
      scale_same_dtype(static_cast<const T*>(a.d_weight_sum.data), scale,
                 static_cast<T*>(a.d_weight.data), a.d_weight.numel());
    });
  }
}

}  // namespace flashdelta::detail::cpu
