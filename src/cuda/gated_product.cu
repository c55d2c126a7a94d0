// swiglu and attention_gate on the GPU (include/flashdelta/gated_product.h for the math and the
// rounding, which follows transformers' compositions step by step, as torch's CUDA kernels
// round them: the attention gate's d_gate rounds each step of torch's CUDA sigmoid_backward to
// the half type, where torch's CPU kernel for bf16 does not; see the kernel).
//
// One elementwise pass: a thread handles 16-byte vectors (8 bf16 / fp16, 4 fp32) of [R, D],
// grid-strided over the R * D / N vectors; rows may have any stride (the attention gate is read
// straight out of q_proj's output). Forward reads value and gate, writes out; backward reads
// value, gate and d_out, writes d_value and d_gate (the activation is recomputed, not stored).
// Vector path when D and every row stride are multiples of N and the pointers are 16-byte
// aligned; otherwise the same kernel with N = 1.
#include <algorithm>

#include "core/fused_ops_backend.h"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/fused_ops_common.cuh"
#include "cuda/gated_delta_rule_cuda.h"

namespace flashdelta::detail::cuda {
namespace {

using namespace fused;

constexpr int kThreads = 256;

struct GatedProductParams {
  const void* value;
  const void* gate;
  const void* d_out;  // backward
  void* out;          // forward: out; backward: d_value
  void* d_gate;       // backward
  int64_t value_stride, gate_stride, d_out_stride, out_stride, d_gate_stride;
  int64_t rows, dim;
};

template <GateActivation kAct>
__device__ __forceinline__ float activation(float z) {
  return kAct == GateActivation::kSilu ? silu(z) : sigmoid(z);
}

// Index: uint32_t when the vector count allows (a 32-bit division per vector is far cheaper than
// a 64-bit one, which would cost more than the memory access), else int64_t. Offsets are 64-bit.
template <typename T, int N, GateActivation kAct, bool kBackward, typename Index>
__global__ void __launch_bounds__(kThreads) gated_product_kernel(const GatedProductParams p) {
  const Index vecs_per_row = static_cast<Index>(p.dim / N);
  const Index total = static_cast<Index>(p.rows) * vecs_per_row;
  for (Index i = static_cast<Index>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<Index>(gridDim.x) * kThreads) {
    const int64_t row = i / vecs_per_row;
    const int64_t col = static_cast<int64_t>(i - static_cast<Index>(row) * vecs_per_row) * N;
    float v[N], z[N], out[N];
    load_pack<T, N>(static_cast<const T*>(p.value) + row * p.value_stride + col, v);
    load_pack<T, N>(static_cast<const T*>(p.gate) + row * p.gate_stride + col, z);
    if constexpr (!kBackward) {
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = mul_rn(v[k], round_to<T>(activation<kAct>(z[k])));
    } else {
      float dy[N], dz[N];
      load_pack<T, N>(static_cast<const T*>(p.d_out) + row * p.d_out_stride + col, dy);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float d_a = round_to<T>(mul_rn(dy[k], v[k]));
        float a;
        if constexpr (kAct == GateActivation::kSilu) {
          const float sig = sigmoid(z[k]);
          a = round_to<T>(silu(z[k]));
          dz[k] = __fmul_rn(__fmul_rn(d_a, sig), 1.0f + z[k] * (1.0f - sig));
        } else {
          // torch's CUDA sigmoid_backward evaluates `d_a * (1 - a) * a` in the storage type:
          // for bf16 / fp16 each of the three operations rounds (c10's half-type operators
          // compute in fp32 and return the half type); round_to<float> is the identity.
          a = round_to<T>(sigmoid(z[k]));
          const float one_minus_a = round_to<T>(1.0f - a);
          dz[k] = __fmul_rn(round_to<T>(__fmul_rn(d_a, one_minus_a)), a);
        }
        out[k] = mul_rn(dy[k], a);
      }
      store_pack<T, N>(static_cast<T*>(p.d_gate) + row * p.d_gate_stride + col, dz);
    }
    store_pack<T, N>(static_cast<T*>(p.out) + row * p.out_stride + col, out);
  }
}

template <typename T, GateActivation kAct, bool kBackward>
void launch(const GatedProductParams& p, bool vector, int device, cudaStream_t stream) {
  const int n = vector ? kVec<T> : 1;
  const int64_t work = p.rows * (p.dim / n);
  // Enough resident blocks to cover the GPU a few times over; the loop strides the rest.
  const int64_t max_blocks = static_cast<int64_t>(device_info(device).sm_count) * 16;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
  // 32-bit indices while the last grid stride cannot wrap around
  const bool narrow = work <= (int64_t{1} << 31);
  if (vector && narrow) {
    gated_product_kernel<T, kVec<T>, kAct, kBackward, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
  } else if (vector) {
    gated_product_kernel<T, kVec<T>, kAct, kBackward, int64_t><<<blocks, kThreads, 0, stream>>>(p);
  } else if (narrow) {
    gated_product_kernel<T, 1, kAct, kBackward, uint32_t><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    gated_product_kernel<T, 1, kAct, kBackward, int64_t><<<blocks, kThreads, 0, stream>>>(p);
  }
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

template <bool kBackward>
void run(GateActivation act, const GatedProductParams& p, DType dtype,
         std::initializer_list<const TensorRef*> tensors, int device, cudaStream_t stream) {
  if (p.rows == 0) return;
  DeviceGuard guard(device);
  dispatch_float(dtype, [&](auto t) {
    using T = decltype(t);
    bool vector = p.dim % kVec<T> == 0;
    for (const TensorRef* x : tensors) vector = vector && vector_aligned(*x, kVec<T>);
    if (act == GateActivation::kSilu) {
      launch<T, GateActivation::kSilu, kBackward>(p, vector, device, stream);
    } else {
      launch<T, GateActivation::kSigmoid, kBackward>(p, vector, device, stream);
    }
  });
}

}  // namespace

void gated_product_forward(GateActivation act, const GatedProductArgs& in, const TensorRef& out,
                           const RowsShape& s) {
  GatedProductParams p{};
  p.value = in.value.data;
  p.gate = in.gate.data;
  p.out = out.data;
  p.value_stride = in.value.stride(0);
  p.gate_stride = in.gate.stride(0);
  p.out_stride = out.stride(0);
  p.rows = s.rows;
  p.dim = s.dim;
  run<false>(act, p, in.value.dtype, {&in.value, &in.gate, &out}, in.value.device.index,
             static_cast<cudaStream_t>(in.stream));
}

void gated_product_backward(GateActivation act, const GatedProductArgs& in,
                            const GatedProductGradients& g, const RowsShape& s) {
  GatedProductParams p{};
  p.value = in.value.data;
  p.gate = in.gate.data;
  p.d_out = g.d_out.data;
  p.out = g.d_value.data;
  p.d_gate = g.d_gate.data;
  p.value_stride = in.value.stride(0);
  p.gate_stride = in.gate.stride(0);
  p.d_out_stride = g.d_out.stride(0);
  p.out_stride = g.d_value.stride(0);
  p.d_gate_stride = g.d_gate.stride(0);
  p.rows = s.rows;
  p.dim = s.dim;
  run<true>(act, p, in.value.dtype, {&in.value, &in.gate, &g.d_out, &g.d_value, &g.d_gate},
            in.value.device.index, static_cast<cudaStream_t>(in.stream));
}

}  // namespace flashdelta::detail::cuda
