// moe_permute / moe_unpermute on CUDA.
//
// moe_permute: a stable counting sort of the P = T * top_k (token, slot) pairs by expert, in four
// launches, with no host synchronisation (CUDA-graph capturable) and no atomics on outputs:
//   1. count:   one 256-thread block per chunk of 256 pairs builds the chunk's histogram over the
//               E + 1 buckets (bucket E: dropped pairs) in shared memory (integer atomics: exact)
//               and writes it bucket-major to the workspace, counts[b][chunk].
//   2. scan:    one 1024-thread block turns counts into exclusive prefix sums in bucket-major
//               order (a warp per bucket row, coalesced), so counts[b][chunk] becomes the first
//               sorted position of chunk's pairs of bucket b; expert_offsets[b] = counts[b][0].
//   3. scatter: one block per chunk (its threads stage the chunk's buckets in shared memory);
//               its first warp walks the chunk in order, 32 pairs a step,
//               ranking equal buckets within the step with __match_any_sync: stable, so the
//               sorted order is (expert, pair index), exactly the CPU's.
//   4. gather:  one block per sorted row copies hidden[pair / top_k] (16-byte vectors when
//               aligned).
// Workspace: (E + 1) * ceil(P / 256) int32.
//
// moe_unpermute: one block per token, fp32 accumulation over its top_k rows in slot order.
// Backward: one block per token writes d_rows = w * d_out for each slot and reduces
// <d_out, rows> to d_weights through a fixed-order block reduction (one barrier per 32 slots,
// not two per slot). Deterministic throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/moe_backend.h"
#include "cuda/convert.cuh"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/moe_common.cuh"

namespace flashdelta::detail::cuda {

namespace {

using moe::warp_sum;

constexpr int kChunk = 256;       // pairs per sort block
constexpr int kScanThreads = 1024;
constexpr int kRowThreads = 128;  // threads per row in gather / combine

struct PairIndex {
  const void* indices;
  bool is_int64;
  int64_t stride_t, stride_k;
  int64_t top_k;
  int64_t num_experts;

  // The bucket of pair p: its expert, or E when out of range (dropped).
  __device__ __forceinline__ int bucket(int64_t p) const {
    const int64_t off = (p / top_k) * stride_t + (p % top_k) * stride_k;
    const int64_t e = is_int64 ? static_cast<const int64_t*>(indices)[off]
                               : static_cast<const int32_t*>(indices)[off];
    return (e >= 0 && e < num_experts) ? static_cast<int>(e) : static_cast<int>(num_experts);
  }
};

__global__ void __launch_bounds__(kChunk)
count_kernel(const PairIndex pairs, int64_t num_pairs, int32_t* counts, int64_t num_chunks) {
  extern __shared__ int histogram[];
  const int buckets = static_cast<int>(pairs.num_experts) + 1;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) histogram[b] = 0;
  __syncthreads();
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (p < num_pairs) atomicAdd(&histogram[pairs.bucket(p)], 1);
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    counts[static_cast<int64_t>(b) * num_chunks + blockIdx.x] = histogram[b];
  }
}

// Exclusive prefix sums of counts in bucket-major order, by one block: warp w owns buckets
// w, w + 32, ... Pass 1: each bucket's total (a warp reads its [chunks] row coalesced); the
// totals' exclusive scan gives each bucket's first sorted position (= expert_offsets); pass 2:
// each warp scans its buckets' rows from those bases. The first version walked contiguous
// segments per thread (uncoalesced: every load touched 32 lines): 83 us at 65k counts, against
// a few us for reading and writing 0.26 MB.
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  return v;
}

constexpr int kScanPerLane = 8;  // consecutive counts a lane reads per step: 1 KB a warp

__global__ void __launch_bounds__(kScanThreads)
scan_kernel(int32_t* counts, int64_t num_chunks, int num_experts, int32_t* expert_offsets) {
  extern __shared__ int32_t bucket_base[];  // [E + 1]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = kScanThreads / 32;
  const int buckets = num_experts + 1;
  constexpr int kStep = 32 * kScanPerLane;
  for (int b = warp; b < buckets; b += warps) {
    const int32_t* row = counts + static_cast<int64_t>(b) * num_chunks;
    int32_t total = 0;
    for (int64_t c0 = 0; c0 < num_chunks; c0 += kStep) {
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int64_t c = c0 + lane * kScanPerLane + i;
        if (c < num_chunks) total += row[c];
      }
    }
    total = warp_inclusive_scan(total, lane);  // lane 31: the bucket's total
    if (lane == 31) bucket_base[b] = total;
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the totals, 32 buckets a step
    int32_t carry = 0;
    for (int b0 = 0; b0 < buckets; b0 += 32) {
      const int b = b0 + lane;
      const int32_t total = b < buckets ? bucket_base[b] : 0;
      const int32_t inclusive = warp_inclusive_scan(total, lane);
      if (b < buckets) {
        bucket_base[b] = carry + inclusive - total;
        expert_offsets[b] = carry + inclusive - total;
      }
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
  __syncthreads();
  for (int b = warp; b < buckets; b += warps) {
    int32_t* row = counts + static_cast<int64_t>(b) * num_chunks;
    int32_t carry = bucket_base[b];
    for (int64_t c0 = 0; c0 < num_chunks; c0 += kStep) {
      int32_t v[kScanPerLane];
      int32_t local = 0;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int64_t c = c0 + lane * kScanPerLane + i;
        v[i] = c < num_chunks ? row[c] : 0;
        local += v[i];
      }
      const int32_t inclusive = warp_inclusive_scan(local, lane);
      int32_t running = carry + inclusive - local;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int64_t c = c0 + lane * kScanPerLane + i;
        if (c < num_chunks) row[c] = running;
        running += v[i];
      }
      carry += __shfl_sync(0xffffffffu, inclusive, 31);
    }
  }
}

__global__ void __launch_bounds__(kChunk)
scatter_kernel(const PairIndex pairs, int64_t num_pairs, const int32_t* starts,
               int64_t num_chunks, int32_t* sorted_pairs, int32_t* pair_position) {
  extern __shared__ int next[];  // next free sorted position of each bucket for this chunk
  __shared__ int chunk_buckets[kChunk];
  const int buckets = static_cast<int>(pairs.num_experts) + 1;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) {
    next[b] = starts[static_cast<int64_t>(b) * num_chunks + blockIdx.x];
  }
  {  // every thread fetches one pair's bucket, so the ordered walk below reads shared memory only
    const int64_t p = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
    chunk_buckets[threadIdx.x] = p < num_pairs ? pairs.bucket(p) : -1;
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  for (int step = 0; step < kChunk / 32; ++step) {
    const int64_t p = static_cast<int64_t>(blockIdx.x) * kChunk + step * 32 + lane;
    const bool valid = p < num_pairs;
    const int b = chunk_buckets[step * 32 + lane];  // -1 past the end
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (valid) {
      const int32_t q = next[b] + rank;
      sorted_pairs[q] = static_cast<int32_t>(p);
      pair_position[p] = q;
    }
    __syncwarp();  // every lane has read next[b] before the leaders advance it
    if (valid && lane == __ffs(peers) - 1) next[b] += __popc(peers);
    __syncwarp();
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kVec elements of T per 16 bytes; loads and stores of one vector as floats.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* src, float (&f)[kSize]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kSize; ++i) f[i] = to_float<T>(e[i]);
  }
  __device__ __forceinline__ static void store(T* dst, const float (&f)[kSize]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kSize; ++i) e[i] = from_float<T>(f[i]);
    *reinterpret_cast<uint4*>(dst) = raw;
  }
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
gather_kernel(const T* hidden, int64_t hidden_stride, const int32_t* sorted_pairs, int64_t top_k,
              int64_t H, bool vector_ok, T* permuted) {
  const int64_t q = blockIdx.x;
  const T* src = hidden + (sorted_pairs[q] / top_k) * hidden_stride;
  T* dst = permuted + q * H;
  if (vector_ok) {
    for (int64_t v = threadIdx.x; v < H / Vec<T>::kSize; v += blockDim.x) {
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[h] = src[h];
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
unpermute_kernel(const T* rows, const void* weights, DType weights_dtype, int64_t w_stride_t,
                 int64_t w_stride_k, const int32_t* position, int64_t top_k, int64_t H,
                 bool vector_ok, T* out) {
  const int64_t t = blockIdx.x;
  auto weight = [&](int64_t j) {
    return weights ? load_float(weights, weights_dtype, t * w_stride_t + j * w_stride_k)
                   : 1.0f;
  };
  if (vector_ok) {
    constexpr int kV = Vec<T>::kSize;
    for (int64_t v = threadIdx.x; v < H / kV; v += blockDim.x) {
      float acc[kV] = {};
      for (int64_t j = 0; j < top_k; ++j) {
        const float w = weight(j);
        float x[kV];
        Vec<T>::load(rows + static_cast<int64_t>(position[t * top_k + j]) * H + v * kV, x);
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[i] += w * x[i];
      }
      Vec<T>::store(out + t * H + v * kV, acc);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        acc += weight(j) * to_float<T>(rows[static_cast<int64_t>(position[t * top_k + j]) * H + h]);
      }
      out[t * H + h] = from_float<T>(acc);
    }
  }
}

// One block per token. The top_k slots are independent until their <d_out, row> dot products
// are reduced: each warp reduces its share of a slot with a butterfly and parks it in shared
// memory, and one barrier per kSlotGroup slots (one for top_k <= 32) lets thread j sum slot j's
// warp partials in warp order. The sums are the same, in the same order, as a barrier per slot
// would give (bitwise), but the slots' loads no longer wait for each other's reductions.
constexpr int kSlotGroup = 32;

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
unpermute_backward_kernel(const T* rows, const void* weights, DType weights_dtype,
                          int64_t w_stride_t, int64_t w_stride_k, const int32_t* position,
                          int64_t top_k, int64_t H, const T* d_out, int64_t d_out_stride,
                          bool vector_ok, T* d_rows, void* d_weights) {
  constexpr int kWarps = kRowThreads / 32;
  __shared__ float partials[kSlotGroup][kWarps];
  const int64_t t = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const T* dy = d_out + t * d_out_stride;
  for (int64_t j0 = 0; j0 < top_k; j0 += kSlotGroup) {
    const int64_t j1 = j0 + kSlotGroup < top_k ? j0 + kSlotGroup : top_k;
    for (int64_t j = j0; j < j1; ++j) {
      const float w = weights ? load_float(weights, weights_dtype, t * w_stride_t + j * w_stride_k)
                              : 1.0f;
      const int64_t q = position[t * top_k + j];
      float dot = 0.0f;
      if (vector_ok) {
        constexpr int kV = Vec<T>::kSize;
        for (int64_t v = threadIdx.x; v < H / kV; v += blockDim.x) {
          float d[kV], scaled[kV];
          Vec<T>::load(dy + v * kV, d);
#pragma unroll
          for (int i = 0; i < kV; ++i) scaled[i] = w * d[i];
          Vec<T>::store(d_rows + q * H + v * kV, scaled);
          if (d_weights) {
            float x[kV];
            Vec<T>::load(rows + q * H + v * kV, x);
#pragma unroll
            for (int i = 0; i < kV; ++i) dot += d[i] * x[i];
          }
        }
      } else {
        for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
          const float d = to_float<T>(dy[h]);
          d_rows[q * H + h] = from_float<T>(w * d);
          if (d_weights) dot += d * to_float<T>(rows[q * H + h]);
        }
      }
      if (d_weights) {  // uniform branch: every lane of every warp takes it
        dot = warp_sum(dot);
        if (threadIdx.x % 32 == 0) partials[j - j0][warp] = dot;
      }
    }
    if (d_weights) {
      __syncthreads();  // this group's partials are in shared memory
      if (threadIdx.x < j1 - j0) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < kWarps; ++i) total += partials[threadIdx.x][i];
        store_float(d_weights, weights_dtype, t * top_k + j0 + threadIdx.x, total);
      }
      __syncthreads();  // partials free for the next group
    }
  }
}

template <typename F>
void visit_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(float{}); break;
  }
}

int64_t num_chunks(const MoePermuteShape& s) { return (s.num_pairs + kChunk - 1) / kChunk; }

}  // namespace

size_t moe_permute_workspace_bytes(const MoePermuteShape& s) {
  return sizeof(int32_t) * static_cast<size_t>((s.num_experts + 1) * num_chunks(s));
}

void moe_permute(const MoePermuteShape& s, const MoePermuteArgs& a) {
  DeviceGuard guard(a.hidden.device.index);
  auto stream = static_cast<cudaStream_t>(a.stream);
  auto* offsets = static_cast<int32_t*>(a.expert_offsets.data);
  if (s.num_pairs == 0) {
    FLASHDELTA_CUDA_CHECK(cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (s.num_experts + 1), stream));
    return;
  }
  const PairIndex pairs{a.indices.data, a.indices.dtype == DType::kInt64, a.indices.strides[0],
                        a.indices.strides[1], s.top_k, s.num_experts};
  const int64_t chunks = num_chunks(s);
  auto* counts = static_cast<int32_t*>(a.workspace.data);
  const size_t histogram_bytes = sizeof(int) * (s.num_experts + 1);
  auto* sorted_pairs = static_cast<int32_t*>(a.sorted_pairs.data);
  auto* pair_position = static_cast<int32_t*>(a.pair_position.data);

  count_kernel<<<static_cast<unsigned>(chunks), kChunk, histogram_bytes, stream>>>(
      pairs, s.num_pairs, counts, chunks);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  scan_kernel<<<1, kScanThreads, histogram_bytes, stream>>>(
      counts, chunks, static_cast<int>(s.num_experts), offsets);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  scatter_kernel<<<static_cast<unsigned>(chunks), kChunk, histogram_bytes, stream>>>(
      pairs, s.num_pairs, counts, chunks, sorted_pairs, pair_position);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());

  visit_storage(a.hidden.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* hidden = static_cast<const T*>(a.hidden.data);
    T* permuted = static_cast<T*>(a.permuted.data);
    const int64_t stride = a.hidden.strides[0];
    const bool vector_ok = s.hidden % Vec<T>::kSize == 0 && stride % Vec<T>::kSize == 0 &&
                           aligned16(hidden) && aligned16(permuted);
    gather_kernel<T><<<static_cast<unsigned>(s.num_pairs), kRowThreads, 0, stream>>>(
        hidden, stride, sorted_pairs, s.top_k, s.hidden, vector_ok, permuted);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void moe_unpermute_forward(const MoePermuteShape& s, const MoeUnpermuteArgs& a) {
  DeviceGuard guard(a.rows.device.index);
  auto stream = static_cast<cudaStream_t>(a.stream);
  const bool has_weights = a.weights.defined();
  visit_storage(a.rows.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* rows = static_cast<const T*>(a.rows.data);
    T* out = static_cast<T*>(a.out.data);
    const bool vector_ok = s.hidden % Vec<T>::kSize == 0 && aligned16(rows) && aligned16(out);
    unpermute_kernel<T><<<static_cast<unsigned>(s.num_tokens), kRowThreads, 0, stream>>>(
        rows, has_weights ? a.weights.data : nullptr, a.weights.dtype,
        has_weights ? a.weights.strides[0] : 0, has_weights ? a.weights.strides[1] : 0,
        static_cast<const int32_t*>(a.pair_position.data), s.top_k, s.hidden, vector_ok, out);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void moe_unpermute_backward(const MoePermuteShape& s, const MoeUnpermuteArgs& a,
                            const MoeUnpermuteBackwardArgs& g) {
  DeviceGuard guard(a.rows.device.index);
  auto stream = static_cast<cudaStream_t>(a.stream);
  const bool has_weights = a.weights.defined();
  visit_storage(a.rows.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* rows = static_cast<const T*>(a.rows.data);
    const T* d_out = static_cast<const T*>(g.d_out.data);
    T* d_rows = static_cast<T*>(g.d_rows.data);
    const int64_t d_out_stride = g.d_out.strides[0];
    const bool vector_ok = s.hidden % Vec<T>::kSize == 0 && d_out_stride % Vec<T>::kSize == 0 &&
                           aligned16(rows) && aligned16(d_out) && aligned16(d_rows);
    unpermute_backward_kernel<T><<<static_cast<unsigned>(s.num_tokens), kRowThreads, 0, stream>>>(
        rows, has_weights ? a.weights.data : nullptr, a.weights.dtype,
        has_weights ? a.weights.strides[0] : 0, has_weights ? a.weights.strides[1] : 0,
        static_cast<const int32_t*>(a.pair_position.data), s.top_k, s.hidden, d_out,
        d_out_stride, vector_ok, d_rows, has_weights ? g.d_weights.data : nullptr);
  });
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
