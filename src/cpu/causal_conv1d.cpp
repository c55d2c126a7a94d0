// Depthwise causal conv1d (+ SiLU) on the CPU: forward, backward and the decode update.
//
// Per channel c (sequence b), W taps, `start` the first token of t's sequence:
//   pre[t] = bias + sum_{j = 0}^{min(W - 1, t - start)} weight[W - 1 - j] * x[t - j]
//   y[t] = silu(pre[t]) or pre[t]
// Backward, with dpre[t] = dy[t] * silu'(pre[t]) (dy itself without SiLU):
//   dx[t]   = sum_j weight[W - 1 - j] * dpre[t + j]   over t + j < T in t's sequence
//   dweight = sum_t dpre[t] x[t - j] (tap W - 1 - j),  dbias = sum_t dpre[t]
// Sums are computed in double. Like transformers, which runs the convolution in weight's dtype
// (x cast to it) and casts the result to x's dtype, the convolution and the gradients entering
// and leaving it are rounded to weight's dtype (round_to) where transformers holds them in that
// dtype: bf16 results then equal transformers' bit for bit, or nearly. The backward computes a
// block's inputs, sequence starts and dpre once into its worker's slice of the caller's workspace
// (T x (2 x 16 + 1) values a worker), then dx and the weight gradient from them.
// Parallel over blocks of 16 channels, walked token by token with the channels innermost (see
// ChannelBlock); a channel's weight gradient is summed by one task, over b then t, so the result
// does not depend on the thread count (deterministic).
// Any strides, any W >= 1; varlen offsets already validated by src/core.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/causal_conv1d_backend.h"
#include "cpu/convert.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {
namespace {

using flashdelta::cpu::bf16;
using flashdelta::cpu::f16;
using flashdelta::cpu::from_float;
using flashdelta::cpu::parallel_for;
using flashdelta::cpu::to_float;

constexpr int64_t kChannelsPerTask = 16;

// Element i (in elements, strides applied by the caller) of a tensor of a runtime float dtype.
double load_any(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat64: return static_cast<const double*>(p)[i];
    case DType::kFloat16: return to_float(static_cast<const f16*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const bf16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

void store_any(void* p, DType dtype, int64_t i, double v) {
  switch (dtype) {
    case DType::kFloat64: static_cast<double*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<f16*>(p)[i] = from_float<f16>(v); break;
    case DType::kBFloat16: static_cast<bf16*>(p)[i] = from_float<bf16>(v); break;
    default: static_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// v rounded to a storage dtype (and back).
double round_to(DType dtype, double v) {
  switch (dtype) {
    case DType::kFloat64: return v;
    case DType::kFloat16: return to_float(from_float<f16>(v));
    case DType::kBFloat16: return to_float(from_float<bf16>(v));
    default: return static_cast<float>(v);
  }
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// A [B, C, T] tensor of storage type T, read or written at (b, c, t).
template <typename T>
struct Channels {
  T* data;
  int64_t sb, sc, st;
  Channels(const TensorRef& r)
      : data(static_cast<T*>(r.data)), sb(r.strides[0]), sc(r.strides[1]), st(r.strides[2]) {}
  T& at(int64_t b, int64_t c, int64_t t) const { return data[b * sb + c * sc + t * st]; }
};

// The first token of t's sequence: 0, or the last cu_seqlens offset <= t.
struct SequenceStarts {
  const void* cu = nullptr;
  bool is64 = false;
  int64_t stride = 1, count = 0;  // count = N + 1 offsets

  int64_t offset(int64_t i) const {
    return is64 ? static_cast<const int64_t*>(cu)[i * stride]
                : static_cast<const int32_t*>(cu)[i * stride];
  }
  int64_t start_of(int64_t t) const {
    if (cu == nullptr) return 0;
    int64_t lo = 0, hi = count - 1;  // offset(lo) <= t holds (offset(0) = 0)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (offset(mid) <= t) lo = mid;
      else hi = mid - 1;
    }
    return offset(lo);
  }
};

// start_of(t) for t = 0, 1, 2, ... in order, in O(1) amortised (no binary search per token).
struct SequenceCursor {
  const SequenceStarts& starts;
  int64_t seq = 0;  // the last offset index with offset <= the previous t
  int64_t start_of(int64_t t) {
    if (starts.cu == nullptr) return 0;
    while (seq + 1 < starts.count && starts.offset(seq + 1) <= t) ++seq;
    return starts.offset(seq);
  }
};

SequenceStarts sequence_starts(const CausalConv1dInputs& in) {
  SequenceStarts s;
  if (in.cu_seqlens.defined()) {
    s.cu = in.cu_seqlens.data;
    s.is64 = in.cu_seqlens.dtype == DType::kInt64;
    s.stride = in.cu_seqlens.strides[0];
    s.count = in.cu_seqlens.shape[0];
  }
  return s;
}

double bias_of(const TensorRef& bias, int64_t c) {
  return bias.defined() ? load_any(bias.data, bias.dtype, c * bias.strides[0]) : 0.0;
}

// One task's channels [c0, c0 + count), count <= kChannelsPerTask, walked token by token with
// the channels innermost: they are x's unit-stride dimension in transformers' layout (a
// [B, C, T] view of [B, T, C]), so every inner loop reads contiguous memory and vectorises. (The
// first version walked one channel's row at a time: a stride of C elements per token, a cache
// line per access, and the weight's dtype switched on per tap.) The weight taps are held as
// [W][kChannelsPerTask] doubles.
struct ChannelBlock {
  int64_t c0, count, width;
  DType dtype;  // weight's dtype: what transformers computes the convolution in
  std::vector<double> taps, bias;

  ChannelBlock(const CausalConv1dInputs& in, int64_t task, int64_t channels, int64_t W)
      : c0(task * kChannelsPerTask),
        count(std::min(kChannelsPerTask, channels - task * kChannelsPerTask)),
        width(W),
        dtype(in.weight.dtype),
        taps(static_cast<size_t>(W * kChannelsPerTask), 0.0),
        bias(kChannelsPerTask, 0.0) {
    for (int64_t c = 0; c < count; ++c) {
      bias[c] = bias_of(in.bias, c0 + c);
      for (int64_t k = 0; k < W; ++k) {
        const int64_t at = (c0 + c) * in.weight.strides[0] + k * in.weight.strides[1];
        taps[k * kChannelsPerTask + c] = load_any(in.weight.data, in.weight.dtype, at);
      }
    }
  }
  const double* tap(int64_t k) const { return taps.data() + k * kChannelsPerTask; }
  // x[t] as transformers feeds it to the convolution: cast to weight's dtype.
  template <typename T>
  double input(const Channels<const T>& x, int64_t b, int64_t c, int64_t t) const {
    return round_to(dtype, to_float(x.at(b, c0 + c, t)));
  }
};

template <typename T>
void forward_typed(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                   const CausalConv1dForwardOutputs& out) {
  const Channels<const T> x(in.x);
  const Channels<T> y(out.y);
  const SequenceStarts starts = sequence_starts(in);
  const int64_t W = s.width, L = s.seq_len;
  const int64_t tasks = (s.channels + kChannelsPerTask - 1) / kChannelsPerTask;
  parallel_for(tasks, [&](int64_t task, int) {
    const ChannelBlock blk(in, task, s.channels, W);
    const int64_t n = blk.count;
    for (int64_t b = 0; b < s.batch; ++b) {
      SequenceCursor seq{starts};
      for (int64_t t = 0; t < L; ++t) {
        const int64_t reach = std::min(W - 1, t - seq.start_of(t));
        double p[kChannelsPerTask];
        for (int64_t c = 0; c < n; ++c) p[c] = blk.bias[c];
        for (int64_t j = 0; j <= reach; ++j) {
          const double* w = blk.tap(W - 1 - j);
          for (int64_t c = 0; c < n; ++c) p[c] += w[c] * blk.input(x, b, c, t - j);
        }
        for (int64_t c = 0; c < n; ++c) {
          const double v = round_to(blk.dtype, p[c]);
          y.at(b, blk.c0 + c, t) = from_float<T>(round_to(blk.dtype, in.silu ? v * sigmoid(v) : v));
        }
      }
    }
  });
}

// The backward's per-worker scratch (from the caller's workspace), for one task's channels of
// one sequence row: x cast to weight's dtype and dpre, [T][kChannelsPerTask] each, and the
// sequence start of every token.
struct BlockScratch {
  double* input;
  double* dpre;
  int64_t* start;
};
size_t block_scratch_bytes(int64_t seq_len) {
  return static_cast<size_t>(seq_len) * (2 * kChannelsPerTask * sizeof(double) + sizeof(int64_t));
}
BlockScratch block_scratch(void* workspace, int worker, int64_t seq_len) {
  auto* base = static_cast<unsigned char*>(workspace) + worker * block_scratch_bytes(seq_len);
  auto* doubles = reinterpret_cast<double*>(base);
  return {doubles, doubles + seq_len * kChannelsPerTask,
          reinterpret_cast<int64_t*>(doubles + 2 * seq_len * kChannelsPerTask)};
}

template <typename T>
void backward_typed(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                    const CausalConv1dBackwardInputs& gin,
                    const CausalConv1dBackwardOutputs& gout) {
  const Channels<const T> x(in.x), dy(gin.dy);
  const Channels<T> dx(gout.dx);
  const SequenceStarts starts = sequence_starts(in);
  const int64_t W = s.width, L = s.seq_len, CB = kChannelsPerTask;
  const int64_t tasks = (s.channels + CB - 1) / CB;
  parallel_for(tasks, [&](int64_t task, int worker) {
    const ChannelBlock blk(in, task, s.channels, W);
    const int64_t n = blk.count;
    const BlockScratch row = block_scratch(gout.workspace.data, worker, L);
    std::vector<double> dweight(static_cast<size_t>(W * CB), 0.0);  // [tap][channel]
    double dbias[kChannelsPerTask] = {};
    for (int64_t b = 0; b < s.batch; ++b) {
      // One pass for the inputs, sequence starts and dpre (each computed once).
      SequenceCursor seq{starts};
      for (int64_t t = 0; t < L; ++t) {
        row.start[t] = seq.start_of(t);
        for (int64_t c = 0; c < n; ++c) row.input[t * CB + c] = blk.input(x, b, c, t);
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t reach = std::min(W - 1, t - row.start[t]);
        double pre[kChannelsPerTask];
        for (int64_t c = 0; c < n; ++c) pre[c] = blk.bias[c];
        for (int64_t j = 0; j <= reach; ++j) {
          const double* w = blk.tap(W - 1 - j);
          const double* xin = row.input + (t - j) * CB;
          for (int64_t c = 0; c < n; ++c) pre[c] += w[c] * xin[c];
        }
        double* dpre = row.dpre + t * CB;
        for (int64_t c = 0; c < n; ++c) {
          const double p = round_to(blk.dtype, pre[c]);
          const double g = round_to(blk.dtype, to_float(dy.at(b, blk.c0 + c, t)));
          if (in.silu) {
            const double sg = sigmoid(p);
            dpre[c] = round_to(blk.dtype, g * sg * (1.0 + p * (1.0 - sg)));
          } else {
            dpre[c] = g;
          }
        }
      }
      // dx[t] = sum_j weight[W - 1 - j] dpre[t + j] over t + j in t's sequence.
      for (int64_t t = 0; t < L; ++t) {
        double acc[kChannelsPerTask] = {};
        for (int64_t j = 0; j < W && t + j < L; ++j) {
          if (row.start[t + j] > t) break;  // t + j is in a later sequence
          const double* w = blk.tap(W - 1 - j);
          const double* dp = row.dpre + (t + j) * CB;
          for (int64_t c = 0; c < n; ++c) acc[c] += w[c] * dp[c];
        }
        for (int64_t c = 0; c < n; ++c) {
          dx.at(b, blk.c0 + c, t) = from_float<T>(round_to(blk.dtype, acc[c]));
        }
      }
      // Tap W - 1 - j: sum over t of dpre[t] x[t - j], per channel over b then t (a fixed
      // order whatever the thread count: deterministic).
      for (int64_t k = 0; k < W; ++k) {
        const int64_t j = W - 1 - k;
        double* dw = dweight.data() + k * CB;
        for (int64_t t = j; t < L; ++t) {
          if (t - j < row.start[t]) continue;
          const double* dp = row.dpre + t * CB;
          const double* xin = row.input + (t - j) * CB;
          for (int64_t c = 0; c < n; ++c) dw[c] += dp[c] * xin[c];
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t c = 0; c < n; ++c) dbias[c] += row.dpre[t * CB + c];
      }
    }
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t k = 0; k < W; ++k) {
        store_any(gout.dweight.data, gout.dweight.dtype,
                  (blk.c0 + c) * gout.dweight.strides[0] + k * gout.dweight.strides[1],
                  dweight[k * CB + c]);
      }
      if (gout.dbias.defined()) {
        store_any(gout.dbias.data, gout.dbias.dtype, (blk.c0 + c) * gout.dbias.strides[0],
                  dbias[c]);
      }
    }
  });
}

template <typename T>
void update_typed(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a) {
  const Channels<const T> x(a.x);
  const Channels<T> y(a.y);
  const TensorRef& st = a.conv_state;
  const int64_t S = s.state_len, L = s.new_tokens, W = s.width;
  const int64_t tasks = (s.channels + kChannelsPerTask - 1) / kChannelsPerTask;
  parallel_for(tasks, [&](int64_t task, int) {
    const int64_t c_end = std::min(s.channels, (task + 1) * kChannelsPerTask);
    for (int64_t c = task * kChannelsPerTask; c < c_end; ++c) {
      for (int64_t b = 0; b < s.batch; ++b) {
        const int64_t state_base = b * st.strides[0] + c * st.strides[1];
        // Column i of concat(conv_state, x) cast to weight's dtype, as transformers
        // concatenates and casts before both the convolution and the state update.
        auto column = [&](int64_t i) {
          return round_to(a.weight.dtype,
                          i < S ? load_any(st.data, st.dtype, state_base + i * st.strides[2])
                                : static_cast<double>(to_float(x.at(b, c, i - S))));
        };
        const double bias = bias_of(a.bias, c);
        for (int64_t l = 0; l < L; ++l) {
          double acc = bias;
          for (int64_t k = 0; k < W; ++k) {
            acc += load_any(a.weight.data, a.weight.dtype,
                            c * a.weight.strides[0] + k * a.weight.strides[1]) *
                   column(S - W + 1 + l + k);
          }
          acc = round_to(a.weight.dtype, acc);
          y.at(b, c, l) =
              from_float<T>(round_to(a.weight.dtype, a.silu ? acc * sigmoid(acc) : acc));
        }
        // Shift left by L, in place: column L + i is read before position L + i is written.
        for (int64_t i = 0; i < S; ++i) {
          store_any(st.data, st.dtype, state_base + i * st.strides[2], column(L + i));
        }
      }
    }
  });
}

template <template <typename> class Fn, typename... Args>
void by_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: return Fn<float>::run(args...);
    case DType::kFloat64: return Fn<double>::run(args...);
    case DType::kFloat16: return Fn<f16>::run(args...);
    case DType::kBFloat16: return Fn<bf16>::run(args...);
    default: break;
  }
}

template <typename T>
struct Forward {
  template <typename... A>
  static void run(A&... a) { forward_typed<T>(a...); }
};
template <typename T>
struct Backward {
  template <typename... A>
  static void run(A&... a) { backward_typed<T>(a...); }
};
template <typename T>
struct Update {
  template <typename... A>
  static void run(A&... a) { update_typed<T>(a...); }
};

}  // namespace

size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dShape& s) {
  return static_cast<size_t>(flashdelta::cpu::num_threads()) * block_scratch_bytes(s.seq_len);
}

void causal_conv1d_forward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                           const CausalConv1dForwardOutputs& out) {
  by_dtype<Forward>(in.x.dtype, s, in, out);
}

void causal_conv1d_backward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                            const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout) {
  by_dtype<Backward>(in.x.dtype, s, in, gin, gout);
}

void causal_conv1d_update(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a) {
  by_dtype<Update>(a.x.dtype, s, a);
}

}  // namespace flashdelta::detail::cpu
