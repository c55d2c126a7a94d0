// Column sums of per-block partials: the last step of the backward kernels that leave a weight
// gradient as one fp32 row per block (rms_norm.cu: [blocks, D]; causal_conv1d.cu:
// [B * token tiles, W + 1, C]). out(j) = sum over r of partials[r, j] for a [rows, cols] matrix,
// the rows added in an order fixed by the shape: deterministic, no atomics.
//
// The sum is latency-bound (a few MB read once), so the layout is about loads in flight. A block
// of 256 threads owns 256 / S columns and splits the rows into S streams (S a power of two, the
// fewest that leave a stream at most kColumnSumAhead rows, and at most 32): thread (s, c) adds
// rows s, s + S, s + 2 S, ... of column c with all its loads issued before the first add (rows
// past the end read as 0, which changes no sum), then thread c of stream 0 adds the S stream
// sums in stream order. A warp reads at least 32 contiguous bytes of a row. The kernels this
// replaces gave a block 32 columns and kept 8 loads in flight: rms_norm's 2048 columns made 64
// blocks for 132 SMs, and the conv's 33 rows at 1 x 8192 took 5 load latencies in a row (5.9 us
// under ncu for 5.4 MB).
// The sums are a programmatic dependent launch (pdl.cuh) of the kernel that wrote the partials,
// which calls allow_dependents() before its last stores: the launch gap between the two kernels
// was ~2.9 us of rms_norm's forward + backward, the dependent launch took 0.6 us of it (H100,
// session 12).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/pdl.cuh"

namespace flashdelta::detail::cuda {

constexpr int kColumnSumThreads = 256;
constexpr int kColumnSumAhead = 20;       // loads in flight a thread
constexpr int kColumnSumMaxStreams = 32;  // >= 8 columns a block: 32-byte row pieces a warp

// Store: a functor with `__device__ void operator()(int64_t column, float sum) const`.
template <class Store>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_sums_kernel(const float* __restrict__ partials, int64_t rows, int64_t cols,
                       int log2_streams, const Store store) {
  __shared__ float stream_sums[kColumnSumThreads];
  wait_for_prerequisite();  // the partials' writer has finished
  const int streams = 1 << log2_streams, block_cols = kColumnSumThreads >> log2_streams;
  const int c = threadIdx.x & (block_cols - 1), s = threadIdx.x >> (8 - log2_streams);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * block_cols + c;
  float total = 0.f;
  if (j < cols) {
    for (int64_t r = s; r < rows; r += int64_t{kColumnSumAhead} << log2_streams) {
      float v[kColumnSumAhead];
#pragma unroll
      for (int a = 0; a < kColumnSumAhead; ++a) {
        const int64_t row = r + (int64_t{a} << log2_streams);
        v[a] = row < rows ? partials[row * cols + j] : 0.f;
      }
#pragma unroll
      for (int a = 0; a < kColumnSumAhead; ++a) total += v[a];
    }
  }
  stream_sums[threadIdx.x] = total;
  __syncthreads();
  if (s == 0 && j < cols) {
    float sum = 0.f;
    for (int t = 0; t < streams; ++t) sum += stream_sums[t * block_cols + c];
    store(j, sum);
  }
}

template <class Store>
void launch_column_sums(const float* partials, int64_t rows, int64_t cols, const Store& store,
                        cudaStream_t stream) {
  static_assert(kColumnSumThreads == 256, "the thread split shifts by 8 - log2_streams");
  if (cols == 0) return;
  int log2_streams = 0;
  while ((int64_t{kColumnSumAhead} << log2_streams) < rows &&
         (1 << log2_streams) < kColumnSumMaxStreams) {
    ++log2_streams;
  }
  const int64_t block_cols = kColumnSumThreads >> log2_streams;
  const auto blocks = static_cast<unsigned>((cols + block_cols - 1) / block_cols);
  launch_dependent(column_sums_kernel<Store>, dim3(blocks), dim3(kColumnSumThreads), 0, stream,
                   partials, rows, cols, log2_streams, store);
}

}  // namespace flashdelta::detail::cuda
