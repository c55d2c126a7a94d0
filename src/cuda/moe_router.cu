// moe_router on CUDA: softmax, top-k and renormalisation of router logits [T, E] in one kernel,
// and its backward to the logits.
//
// One warp per token, 4 tokens per 128-thread block. Lane l holds experts l, l + 32, ... in
// registers (kPerLane = 32 * kPerLane >= E, E <= 1024). The softmax uses warp max / sum
// reductions; top-k takes k rounds of a warp arg-max (larger probability wins; NaN counts as the
// largest, as in torch.topk; exact ties go to the lower expert), each round marking the winner in
// its owner lane's bitmask. The k winners go through shared memory so that the renormalised
// weights are written by all lanes at once. Sums run in a fixed order: deterministic.
//
// Backward per token: recompute the softmax, then (w = s / S when normalising)
//   d_s_j = (d_w_j - sum_m d_w_m w_m) / S   (or d_w_j),   d_logit_e = p_e (d_s(e) - sum_j d_s_j s_j)
// with d_s scattered to a per-warp shared row of E floats (the forward's indices are distinct).
#include <climits>

#include "core/moe_backend.h"
#include "cuda/convert.cuh"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/moe_common.cuh"

namespace flashdelta::detail::cuda {

namespace {

using moe::warp_max;
using moe::warp_sum;

constexpr int kWarpsPerBlock = 4;

struct RouterArgs {
  const void* logits;
  DType dtype;
  int64_t stride_t, stride_e;
  int64_t num_tokens;
  int num_experts, top_k;
  bool normalize;
};

// Is candidate (a, ia) ranked before (b, ib)?
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

// Loads the token's logits and turns them into probabilities p (registers of this lane).
template <int kPerLane>
__device__ __forceinline__ void softmax_registers(const RouterArgs& r, int64_t t, int lane,
                                                  float (&p)[kPerLane]) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < r.num_experts ? load_float(r.logits, r.dtype, t * r.stride_t + e * r.stride_e)
                             : -INFINITY;
    m = fmaxf(m, p[i]);
  }
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < r.num_experts ? expf(p[i] - m) : 0.0f;
    sum += p[i];
  }
  const float inv = 1.0f / warp_sum(sum);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) p[i] *= inv;
}

template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
router_forward_kernel(const RouterArgs r, void* weights, int64_t* indices) {
  extern __shared__ float s_top[];  // [kWarpsPerBlock][top_k]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= r.num_tokens) return;  // whole warps only; no block-wide barrier below
  float p[kPerLane];
  softmax_registers<kPerLane>(r, t, lane, p);

  float* top = s_top + warp * r.top_k;
  unsigned taken = 0;  // bit i: expert lane + 32 i already chosen
  float top_sum = 0.0f;
  for (int j = 0; j < r.top_k; ++j) {
    float best = -INFINITY;
    int best_e = INT_MAX;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < r.num_experts && !((taken >> i) & 1u) && ranks_before(p[i], e, best, best_e)) {
        best = p[i];
        best_e = e;
      }
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, d);
      const int other_e = __shfl_xor_sync(0xffffffffu, best_e, d);
      if (ranks_before(other, other_e, best, best_e)) {
        best = other;
        best_e = other_e;
      }
    }
    if (best_e % 32 == lane) taken |= 1u << (best_e / 32);  // top_k <= E: best_e is an expert
    if (lane == 0) {
      top[j] = best;
      indices[t * r.top_k + j] = best_e;
    }
    top_sum += best;  // the same value on every lane, summed in the same order
  }
  __syncwarp();
  for (int j = lane; j < r.top_k; j += 32) {
    const float w = r.normalize ? top[j] / top_sum : top[j];
    store_float(weights, r.dtype, t * r.top_k + j, w);
  }
}

template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
router_backward_kernel(const RouterArgs r, const int64_t* indices, const void* d_weights,
                       DType d_weights_dtype, int64_t dw_stride_t, int64_t dw_stride_k,
                       void* d_logits) {
  extern __shared__ float s_d_selected[];  // [kWarpsPerBlock][E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= r.num_tokens) return;
  float p[kPerLane];
  softmax_registers<kPerLane>(r, t, lane, p);
  float* d_selected = s_d_selected + warp * r.num_experts;
  for (int e = lane; e < r.num_experts; e += 32) d_selected[e] = 0.0f;

  // The selected probabilities, recomputed from the logits by the lane that handles slot j.
  float m = -INFINITY, sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    if (e < r.num_experts) m = fmaxf(m, load_float(r.logits, r.dtype, t * r.stride_t + e * r.stride_e));
  }
  m = warp_max(m);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    if (e < r.num_experts) sum += expf(load_float(r.logits, r.dtype, t * r.stride_t + e * r.stride_e) - m);
  }
  const float inv = 1.0f / warp_sum(sum);
  auto selected = [&](int j) -> float {
    const int64_t e = indices[t * r.top_k + j];
    if (e < 0 || e >= r.num_experts) return 0.0f;
    return expf(load_float(r.logits, r.dtype, t * r.stride_t + e * r.stride_e) - m) * inv;
  };
  float top_sum = 0.0f, dot = 0.0f;
  for (int j = lane; j < r.top_k; j += 32) top_sum += selected(j);
  top_sum = warp_sum(top_sum);
  for (int j = lane; j < r.top_k; j += 32) {
    dot += load_float(d_weights, d_weights_dtype, t * dw_stride_t + j * dw_stride_k) * selected(j);
  }
  dot = warp_sum(dot) / top_sum;
  float inner = 0.0f;
  __syncwarp();  // d_selected zeroed
  for (int j = lane; j < r.top_k; j += 32) {
    const float dw = load_float(d_weights, d_weights_dtype, t * dw_stride_t + j * dw_stride_k);
    const float d_top = r.normalize ? (dw - dot) / top_sum : dw;
    const int64_t e = indices[t * r.top_k + j];
    if (e < 0 || e >= r.num_experts) continue;
    d_selected[e] += d_top;
    inner += d_top * selected(j);
  }
  inner = warp_sum(inner);
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    if (e < r.num_experts) {
      store_float(d_logits, r.dtype, t * r.num_experts + e, p[i] * (d_selected[e] - inner));
    }
  }
}

RouterArgs router_args(const MoeRouterShape& s, const MoeRouterInputs& in) {
  return RouterArgs{in.logits.data, in.logits.dtype, in.logits.strides[0], in.logits.strides[1],
                    s.num_tokens, static_cast<int>(s.num_experts), static_cast<int>(s.top_k),
                    in.normalize};
}

// Calls f(std::integral_constant<int, kPerLane>) for the smallest kPerLane with 32 kPerLane >= E.
template <typename F>
void with_per_lane(int64_t num_experts, F&& f) {
  if (num_experts <= 32) return f(std::integral_constant<int, 1>{});
  if (num_experts <= 64) return f(std::integral_constant<int, 2>{});
  if (num_experts <= 128) return f(std::integral_constant<int, 4>{});
  if (num_experts <= 256) return f(std::integral_constant<int, 8>{});
  if (num_experts <= 512) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

// Dynamic shared memory above 48 KiB must be opted into per kernel.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    FLASHDELTA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes)));
  }
}

}  // namespace

void moe_router_forward(const MoeRouterShape& s, const MoeRouterInputs& in,
                        const MoeRouterForwardOutputs& out) {
  DeviceGuard guard(in.logits.device.index);
  const RouterArgs r = router_args(s, in);
  const unsigned blocks = static_cast<unsigned>((s.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const size_t shared = sizeof(float) * kWarpsPerBlock * s.top_k;
  with_per_lane(s.num_experts, [&](auto per_lane) {
    auto* kernel = router_forward_kernel<decltype(per_lane)::value>;
    allow_shared_bytes(kernel, shared);
    kernel<<<blocks, kWarpsPerBlock * 32, shared, static_cast<cudaStream_t>(in.stream)>>>(
        r, out.weights.data, static_cast<int64_t*>(out.indices.data));
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void moe_router_backward(const MoeRouterShape& s, const MoeRouterInputs& in,
                         const MoeRouterBackwardArgs& a) {
  DeviceGuard guard(in.logits.device.index);
  const RouterArgs r = router_args(s, in);
  const unsigned blocks = static_cast<unsigned>((s.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const size_t shared = sizeof(float) * kWarpsPerBlock * s.num_experts;
  with_per_lane(s.num_experts, [&](auto per_lane) {
    auto* kernel = router_backward_kernel<decltype(per_lane)::value>;
    allow_shared_bytes(kernel, shared);
    kernel<<<blocks, kWarpsPerBlock * 32, shared, static_cast<cudaStream_t>(in.stream)>>>(
        r, static_cast<const int64_t*>(a.indices.data), a.d_weights.data, a.d_weights.dtype,
        a.d_weights.strides[0], a.d_weights.strides[1], a.d_logits.data);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
