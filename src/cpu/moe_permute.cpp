// moe_permute / moe_unpermute on the CPU.
//
// The sort is a sequential counting sort over the T * top_k pairs (one histogram pass, an
// exclusive scan over E + 1 buckets, one stable scatter pass: bucket E collects dropped pairs);
// it is O(T * top_k) and cheap next to the row copies, which run on the thread pool. The combine
// walks each token's pairs in slot order j = 0 .. top_k - 1 with an fp32 accumulator per element.
#include <cstring>
#include <vector>

#include "core/moe_backend.h"
#include "cpu/moe_common.h"
#include "cpu/parallel.h"

namespace flashdelta::detail::cpu {

using flashdelta::cpu::parallel_for;
using namespace flashdelta::cpu::moe;

namespace {
constexpr int64_t kRowsPerTask = 32;
}

size_t moe_permute_workspace_bytes(const MoePermuteShape&) { return 0; }

void moe_permute(const MoePermuteShape& s, const MoePermuteArgs& a) {
  const int64_t P = s.num_pairs, E = s.num_experts, K = s.top_k, H = s.hidden;
  int32_t* sorted_pairs = static_cast<int32_t*>(a.sorted_pairs.data);
  int32_t* pair_position = static_cast<int32_t*>(a.pair_position.data);
  int32_t* offsets = static_cast<int32_t*>(a.expert_offsets.data);

  auto bucket_of = [&](int64_t p) {
    const int64_t e = load_index2(a.indices, p / K, p % K);
    return (e >= 0 && e < E) ? e : E;  // out of range: dropped, sorted last
  };
  std::vector<int64_t> next(E + 2, 0);
  for (int64_t p = 0; p < P; ++p) ++next[bucket_of(p) + 1];
  for (int64_t e = 0; e <= E; ++e) next[e + 1] += next[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(next[e]);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t q = next[bucket_of(p)]++;
    sorted_pairs[q] = static_cast<int32_t>(p);
    pair_position[p] = static_cast<int32_t>(q);
  }

  const size_t row_bytes = static_cast<size_t>(H) * dtype_size(a.hidden.dtype);
  const char* src = static_cast<const char*>(a.hidden.data);
  char* dst = static_cast<char*>(a.permuted.data);
  const int64_t src_stride = a.hidden.strides[0] * static_cast<int64_t>(dtype_size(a.hidden.dtype));
  parallel_for((P + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    for (int64_t q = task * kRowsPerTask; q < std::min(P, (task + 1) * kRowsPerTask); ++q) {
      std::memcpy(dst + q * static_cast<int64_t>(row_bytes),
                  src + (sorted_pairs[q] / K) * src_stride, row_bytes);
    }
  });
}

void moe_unpermute_forward(const MoePermuteShape& s, const MoeUnpermuteArgs& a) {
  const int64_t T = s.num_tokens, K = s.top_k, H = s.hidden;
  const int32_t* position = static_cast<const int32_t*>(a.pair_position.data);
  parallel_for((T + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    std::vector<float> acc(H);
    for (int64_t t = task * kRowsPerTask; t < std::min(T, (task + 1) * kRowsPerTask); ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < K; ++j) {
        const float w = a.weights.defined() ? load2(a.weights, t, j) : 1.0f;
        const int64_t q = position[t * K + j];
        for (int64_t h = 0; h < H; ++h) acc[h] += w * load2(a.rows, q, h);
      }
      for (int64_t h = 0; h < H; ++h) store_flat(a.out, t * H + h, acc[h]);
    }
  });
}

void moe_unpermute_backward(const MoePermuteShape& s, const MoeUnpermuteArgs& a,
                            const MoeUnpermuteBackwardArgs& g) {
  const int64_t T = s.num_tokens, K = s.top_k, H = s.hidden;
  const int32_t* position = static_cast<const int32_t*>(a.pair_position.data);
  parallel_for((T + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task, int) {
    for (int64_t t = task * kRowsPerTask; t < std::min(T, (task + 1) * kRowsPerTask); ++t) {
      for (int64_t j = 0; j < K; ++j) {
        const float w = a.weights.defined() ? load2(a.weights, t, j) : 1.0f;
        const int64_t q = position[t * K + j];
        float dot = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          const float d = load2(g.d_out, t, h);
          store_flat(g.d_rows, q * H + h, w * d);
          if (g.d_weights.defined()) dot += d * load2(a.rows, q, h);
        }
        if (g.d_weights.defined()) store_flat(g.d_weights, t * K + j, dot);
      }
    }
  });
}

}  // namespace flashdelta::detail::cpu
