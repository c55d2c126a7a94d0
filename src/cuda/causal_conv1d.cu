// Depthwise causal conv1d (+ SiLU) on the GPU: forward, backward and the decode update.
//
// What it computes (include/flashdelta/causal_conv1d.h), per channel c of sequence b, W taps:
//   pre[t] = bias + sum_{j = 0}^{W - 1} weight[W - 1 - j] * x[t - j]   (x[t - j] = 0 before the
//            start of t's sequence)
//   y[t] = silu(pre[t]) or pre[t]
//   dpre[t] = dy[t] * silu'(pre[t]),   dx[t] = sum_j weight[W - 1 - j] dpre[t + j] (same sequence)
//   dweight[W - 1 - j] = sum_t x[t] dpre[t + j],   dbias = sum_t dpre[t]
//
// Why it is shaped this way (the counting behind it): with W = 4 there are 4 multiply-adds per
// element, so the op is memory-bound only if the rest stays small too. At the H100's 3 TB/s copy
// bandwidth a bf16 forward moves 4 bytes per element (read x, write y): 0.75 G elements/us, while
// 132 SMs issue ~30 G thread-instructions/us: a budget of ~40 instructions per element at full
// issue, ~25 at a realistic 60%. The backward moves 6 bytes per element (read x and dy, write
// dx): ~37 at 60%. Counted in the SASS (cuobjdump -sass, sm_90a, bf16, W = 4), the first version
// spent 47 (forward) and 87 (backward) per element and ran at 1.6 and 1.3 TB/s: SiLU with
// torch's accurate expf and an IEEE division (~22 with its slow-path check), the per-token
// sequence mask even without cu_seqlens, 4-byte packs in the backward (2 channels to carry each
// token's overhead), and ~10 register copies per element: the W - 1 token window shifted every
// token and a conditional exit after every token (the compiler moved the ring and the pointers
// around both). Now (fast path, per element): ~22 forward, ~35 backward:
// - the token loops are templated on varlen: without cu_seqlens there is no mask at all;
// - the forward's bf16 SiLU is silu_bf16_rounding: 2^x and 1/x from the special-function unit,
//   and torch's exact formula only where the result is within reach of a bf16 rounding boundary
//   (~0.2% of the elements), so bf16 outputs stay equal to transformers' bit for bit;
// - the backward's sigmoid for bf16 gradients is MUFU.EX2 and MUFU.RCP (one |v| < 64 test per
//   token): dpre is held to one ulp of the float64 value with rare flips, as before (it never
//   was torch's bits: torch's silu_backward multiplies dy * s first); fp16 and fp32 keep
//   torch's expf with a Newton-refined MUFU.RCP (within an ulp of the IEEE division);
// - the backward moves 8-byte packs of 4 channels like the forward;
// - the inputs of the last W - 1 tokens live in a register history written once per token and
//   shifted once per batch; whole batches run without exit tests, the run's partial batch after;
//   ring refills are unconditional (past the run they repeat its last token: an L1 hit).
// The kernels are templated on everything else that changes the per-element code (x's dtype,
// the rounding dtype, W, the channel pack, SiLU) and carry no runtime dtype switch in the token
// loop; with cu_seqlens the sequence boundaries are a per-thread bit mask tested once per token
// (a warp-uniform branch), not a per-tap select.
//
// Launch shape (forward and backward): a block is 32 x 4 threads and owns a tile of 32 * VEC
// channels by 4 runs of R tokens (R = 32 forward, 56 to 256 backward); grid (channel tiles,
// token tiles, B). Thread (x, y) owns VEC adjacent channels: one 8-byte access per token and
// tensor (4 bf16 channels), when the channel stride is 1 and the strides and address are aligned
// (the layout of transformers' transposed [B, T, C] view); VEC = 1 and any strides otherwise. A
// warp reads 32 * VEC contiguous channels of a token per access (256 bytes: whole sectors). Why not
// 16-byte packs: the per-channel state a thread keeps (W weights, the bias, W - 1 inputs; in the
// backward also W + 1 gradient sums and W - 1 dpre values) grows with VEC; bytes in flight per
// SM do not depend on VEC (more threads with fewer channels each).
// The thread walks its run through a ring of the next tokens' raw packs (TokenRing): token t is
// taken and its slot refilled with token t + depth at once. Packs of 4 bytes or more sit in
// shared memory, copied by cp.async, which holds no register while in flight, 8 tokens deep:
// forward 72 registers and 8 KB a block, 7 blocks per SM: 7 x 128 x 8 x 8 B = 56 KB in flight
// per SM; backward two rings (x, dy), 128 registers and 27 KB, 4 blocks: 64 KB. Both too few and
// too many bytes in flight cost bandwidth (H100, graph replay):
// - session 4's register rings, 8 tokens forward at 5 blocks per SM and 6 + 6 backward at 3 (32
//   and 36 KB in flight), ran at 49% and 59% of the DRAM bandwidth under ncu at 1 x 8192,
//   latency-bound at 9.1 and 5.7 cycles per issued instruction;
// - session 5's shared rings, 16 deep (112 and 128 KB in flight), took 1 x 8192 from 330.9 to
//   313.7 us forward + backward;
// - 8 deep (session 12) was faster again, in both directions and at every size: 1 x 8192
//   forward 120.9 -> 115.0 us, forward + backward 294.2 -> 279.8; 8 x 4096 397.7 -> 395.2 and
//   999.8 -> 986.7 (4 deep: as fast forward, slower backward; 32 deep: 144.5 us forward). So
//   does rms_norm with fewer rows in flight (its kStages).
// 2-byte packs (VEC = 1 in 16-bit dtypes, the generic path; cp.async copies 4 bytes or more) keep
// a ring of registers. The backward lengthens its runs to fit the grid in one wave where it can
// (see backward_run_tokens). x is read once plus a W - 1 token halo per run (an L2 hit: the
// neighbouring run).
//
// Backward, one pass over x and dy: the thread recomputes pre and dpre for its run plus a W - 1
// token look-ahead and emits dx[t - (W - 1)] and the weight-gradient terms x[t - (W - 1)] *
// dpre[t - (W - 1) + j] once dpre[t] is known. The weight and bias gradients are summed per
// thread, over the block's 4 runs in shared memory (fixed order), and written as one fp32
// partial per (b, token tile, tap, channel): [B * tiles, W + 1, C], 20 bytes per channel per
// 224 tokens against the kernel's 6 per channel per token (1.5%). A second kernel sums the
// partials over (b, tile) in a fixed order (column_sums.cuh): deterministic, no atomics.
//
// Update (decode): one thread per 16 bytes of conv_state in the decode case (L = 1, S = 4, state
// [B, C, 4] contiguous in x's dtype: two bf16 rows, one fp32 row), which reads its rows and the
// new inputs, writes the outputs and the shifted rows, one access each way. Any other shape or
// layout: one thread per (b, c), which shifts its row in place (column L + i is read before
// position i is written, and no other thread touches the row).
//
// Rounding: transformers runs the convolution in weight's dtype (x cast to it) and casts the
// result to x's dtype; the kernels round where it holds a value in weight's dtype, so bf16
// results equal its own.
//
// Assumes: W in [2, 4] (templates; core checks), grid.y = token tiles <= 65535 and B <= 65535
// (checked), y / dx not overlapping the inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "cuda/column_sums.cuh"
#include "cuda/convert.cuh"
#include "cuda/cp_async.cuh"
#include "core/causal_conv1d_backend.h"
#include "core/check.h"
#include "cuda/cuda_check.cuh"
#include "cuda/device_info.cuh"
#include "cuda/gated_delta_rule_cuda.h"
#include "cuda/pdl.cuh"

namespace flashdelta::detail::cuda {
namespace {

constexpr int kChannelThreads = 32;  // blockDim.x
constexpr int kRuns = 4;             // blockDim.y: runs of tokens per block
constexpr int kThreads = kChannelThreads * kRuns;
constexpr int kBatch = 8;            // forward: tokens loaded per batch (one batch ahead)
constexpr int kBackwardBatch = 6;    // backward: 6 tokens of x and dy ahead, 8-byte packs
constexpr int kForwardRunTokens = 32;
// Longer runs in the backward: fewer weight-gradient partials and less halo per token. A run,
// its W - 1 halo and W - 1 look-ahead tokens must fit the 64-bit sequence-start mask.
constexpr int kBackwardRunTokens = 56;
constexpr int kForwardPackBytes = 8;
constexpr int kBackwardPackBytes = 8;
constexpr int kMaxGridYZ = 65535;
static_assert(kBackwardRunTokens + 2 * (kCausalConv1dCudaMaxWidth - 1) <= 64, "start mask");
// Without cu_seqlens the backward takes longer runs, up to this (backward_run_tokens).
constexpr int kMaxBackwardRunTokens = 256;
static_assert((kBackwardRunTokens + kCausalConv1dCudaMaxWidth - 1) * (int64_t{1} << 24) <
                  (int64_t{1} << 31),
              "32-bit run offsets at the default run length (longer runs: max_backward_run)");

// Where transformers holds a value in weight's dtype: no rounding (fp32 weight), to bf16, to
// fp16, or by the runtime dtype (the generic kernels, any dtype mix).
enum RoundTo : int { kRoundNone = 0, kRoundBF16 = 1, kRoundF16 = 2, kRoundRuntime = 3 };

struct ConvParams {
  const void* x;
  const void* dy;  // backward only
  void* out;       // y (forward) or dx (backward)
  const void* weight;
  const void* bias;   // nullptr: no bias
  DType param_dtype;  // weight's and bias's
  int64_t x_s[3], dy_s[3], out_s[3];
  int64_t weight_s[2], bias_s;
  const void* cu_seqlens;  // nullptr: not varlen
  bool cu_seqlens_64;
  int64_t cu_seqlens_stride, num_offsets;  // N + 1
  int64_t channels, seq_len;
  int64_t num_tiles;  // token tiles per sequence row (grid.y)
  int run_tokens;     // tokens per run (a tile is kRuns runs): see backward_run_tokens
  float* partials;    // backward: [B * num_tiles, W + 1, C]
  bool silu;
};

// v rounded to `dtype` and back (identity for fp32).
__device__ __forceinline__ float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(__float2half_rn(v));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return v;
  }
}

template <int kRound>
__device__ __forceinline__ float round_param(DType runtime_dtype, float v) {
  if constexpr (kRound == kRoundBF16) return __bfloat162float(__float2bfloat16_rn(v));
  else if constexpr (kRound == kRoundF16) return __half2float(__float2half_rn(v));
  else if constexpr (kRound == kRoundRuntime) return round_to(runtime_dtype, v);
  else return v;
}

// Whether rounding to the weight's dtype is what storing in T does anyway (or nothing at all):
// then values read from T need no rounding and values stored to T need only the store's.
template <typename T, int kRound>
constexpr bool kRoundIsFree =
    kRound == kRoundNone || (kRound == kRoundBF16 && std::is_same_v<T, __nv_bfloat16>) ||
    (kRound == kRoundF16 && std::is_same_v<T, __half>);

// VEC adjacent channels of one token, loaded or stored as one access (the decode update's state
// rows).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC adjacent channels of one token as the conv kernels load and store them: 32-bit words
// (VEC * sizeof(T) >= 4 bytes), or one 16-bit element in the low half of a word (VEC = 1).
// Words, not T[VEC]: unpacking a bf16 is then one shift or mask, not a 16-bit extract (PRMT),
// and the ring of tokens in flight holds no half-registers.
template <typename T, int VEC>
struct Raw {
  static constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  uint32_t w[kWords];
};

// The pack of channels c0 .. c0 + VEC - 1 at `base` (VEC > 1: channel stride 1 and aligned to
// the pack; VEC = 1: one element, any strides).
template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> load_raw(const T* __restrict__ base) {
  Raw<T, VEC> r;
  if constexpr (Raw<T, VEC>::kBytes == 16) {
    const uint4 q = *reinterpret_cast<const uint4*>(base);
    r.w[0] = q.x, r.w[1] = q.y, r.w[2] = q.z, r.w[3] = q.w;
  } else if constexpr (Raw<T, VEC>::kBytes == 8) {
    const uint2 q = *reinterpret_cast<const uint2*>(base);
    r.w[0] = q.x, r.w[1] = q.y;
  } else if constexpr (Raw<T, VEC>::kBytes == 4) {
    r.w[0] = *reinterpret_cast<const uint32_t*>(base);
  } else {
    static_assert(Raw<T, VEC>::kBytes == 2, "packs of 2, 4, 8 or 16 bytes");
    r.w[0] = *reinterpret_cast<const uint16_t*>(base);
  }
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* __restrict__ base, const Raw<T, VEC>& r) {
  if constexpr (Raw<T, VEC>::kBytes == 16) {
    *reinterpret_cast<uint4*>(base) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
  } else if constexpr (Raw<T, VEC>::kBytes == 8) {
    *reinterpret_cast<uint2*>(base) = make_uint2(r.w[0], r.w[1]);
  } else if constexpr (Raw<T, VEC>::kBytes == 4) {
    *reinterpret_cast<uint32_t*>(base) = r.w[0];
  } else {
    *reinterpret_cast<uint16_t*>(base) = static_cast<uint16_t>(r.w[0]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> zero_raw() {  // +0 in every dtype
  Raw<T, VEC> r;
#pragma unroll
  for (int k = 0; k < Raw<T, VEC>::kWords; ++k) r.w[k] = 0u;
  return r;
}

// Element v of a pack, in fp32 (exact).
template <typename T, int VEC>
__device__ __forceinline__ float raw_element(const Raw<T, VEC>& r, int v) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(r.w[v]);
  } else {
    const uint32_t word = r.w[v / 2];
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of an fp32
      return __uint_as_float(v % 2 ? word & 0xffff0000u : word << 16);
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(v % 2 ? word >> 16 : word)));
    }
  }
}

// Raw values as the convolution takes them: fp32, rounded to weight's dtype where narrower.
template <typename T, int kRound, int VEC>
__device__ __forceinline__ void unpack(const Raw<T, VEC>& r, DType param_dtype,
                                       float (&out)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    out[v] = raw_element<T, VEC>(r, v);
    if constexpr (!kRoundIsFree<T, kRound>) out[v] = round_param<kRound>(param_dtype, out[v]);
  }
}

// Stores VEC fp32 values (rounded to T to nearest even; 16-bit types convert pairs at once).
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ base, const float (&in)[VEC]) {
  Raw<T, VEC> r;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) r.w[v] = __float_as_uint(in[v]);
  } else if constexpr (VEC == 1) {
    const T h = from_f32<T>(in[0]);
    unsigned short bits;
    memcpy(&bits, &h, sizeof(bits));
    r.w[0] = bits;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; v += 2) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 two = __floats2bfloat162_rn(in[v], in[v + 1]);
        memcpy(&r.w[v / 2], &two, sizeof(uint32_t));
      } else {
        const __half2 two = __floats2half2_rn(in[v], in[v + 1]);
        memcpy(&r.w[v / 2], &two, sizeof(uint32_t));
      }
    }
  }
  store_raw<T, VEC>(base, r);
}

// Bit i set: token base + i (0 <= i < count <= 64) is the first token of a packed sequence
// (some cu_seqlens offset > 0 equals it). 0 without cu_seqlens. The offsets are read on the
// device (no host sync): a binary search for the first offset > base, then a walk.
__device__ __forceinline__ uint64_t sequence_starts(const ConvParams& p, int64_t base,
                                                    int count) {
  if (p.cu_seqlens == nullptr) return 0;
  auto offset = [&](int64_t i) -> int64_t {
    return p.cu_seqlens_64
               ? static_cast<const int64_t*>(p.cu_seqlens)[i * p.cu_seqlens_stride]
               : static_cast<const int32_t*>(p.cu_seqlens)[i * p.cu_seqlens_stride];
  };
  int64_t lo = 1, hi = p.num_offsets;  // the first i in [1, N + 1) with offset(i) > base
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (offset(mid) > base) hi = mid;
    else lo = mid + 1;
  }
  uint64_t starts = 0;
  for (int64_t i = lo; i < p.num_offsets; ++i) {
    const int64_t o = offset(i);
    if (o >= base + count) break;
    starts |= uint64_t{1} << (o - base);
  }
  return starts;
}

// How many earlier inputs token t may see (<= W - 1), where bit e of `starts` is token t: the
// distance back to the latest sequence start among tokens t - (W - 2) .. t, else W - 1.
// The token loops pass the mask shifted to the batch (32 bits) and a compile-time e.
template <int W>
__device__ __forceinline__ int reach_back(uint32_t starts, int e) {
  const uint32_t behind = (starts >> (e - (W - 2))) & ((1u << (W - 1)) - 1);
  return behind == 0 ? W - 1 : (W - 2) - (31 - __clz(behind));
}

// How many later tokens share token te's sequence (<= W - 1), bit e of `starts` being te.
template <int W>
__device__ __forceinline__ int reach_ahead(uint32_t starts, int e) {
  const uint32_t ahead = (starts >> (e + 1)) & ((1u << (W - 1)) - 1);
  return ahead == 0 ? W - 1 : __ffs(ahead) - 1;
}

// Token offsets within a run: 32-bit for the packed kernels (the host admits them only when
// every token stride is under kMaxPackedTokenStride: the tokens a run
// reads, at most 2 * 56 + W - 1, then lie under 2^31 elements apart), so a
// ring address is one min, one multiply and one wide add; 64-bit for VEC = 1 (any strides).
constexpr int64_t kMaxPackedTokenStride = int64_t{1} << 24;
template <int VEC>
using TokenOffset = std::conditional_t<(VEC > 1), int, int64_t>;

// The next D tokens' packs of one tensor, for one thread: token i is taken from its slot and
// the slot refilled with token i + D at once, so D tokens stay in flight. Tokens at or past
// `count` (the run's end) read as zeros and are never used, except where a kernel says so.
// Two stores behind one interface (the token loops call take(u, i) with u = i mod the batch, a
// compile-time constant once unrolled):
//   SharedRing: packs of 4, 8 or 16 bytes in shared memory, filled by cp.async, which holds no
//     register while in flight: a ring deeper than the registers allow (bytes in flight per SM
//     are what a memory-bound kernel runs on). Slot s of thread t sits at (s * kThreads + t) *
//     kBytes: a warp's reads of one slot are contiguous. Past `count` the copy zero-fills
//     without reading global memory. The thread must drain() before it exits.
//   RegisterRing: 2-byte packs (VEC = 1 in 16-bit dtypes, below cp.async's 4 bytes) in
//     registers, D = the batch; past `count` the loads repeat the last token (an L1 hit)
//     instead of branching, and the consumer substitutes zeros where it needs them.
template <typename T, int VEC, int D>
struct SharedRing {
  using RawT = Raw<T, VEC>;
  static constexpr int kBytes = RawT::kBytes;
  static constexpr int kSlotStride = kThreads * kBytes;
  static constexpr int kSharedBytes = D * kSlotStride;
  static_assert((D & (D - 1)) == 0, "a power-of-two depth");
  unsigned slot0;  // shared address of this thread's slot 0
  const T* __restrict__ src;
  TokenOffset<VEC> step;
  int count;

  __device__ __forceinline__ SharedRing(unsigned char* smem, const T* src_, TokenOffset<VEC> step_,
                                        int count_)
      : src(src_), step(step_), count(count_) {
    const int t = threadIdx.y * kChannelThreads + threadIdx.x;
    slot0 = static_cast<unsigned>(__cvta_generic_to_shared(smem)) + t * kBytes;
#pragma unroll
    for (int i = 0; i < D; ++i) fetch(i);
  }
  __device__ __forceinline__ void fetch(int i) {
    const bool real = i < count;
    cp_async_zfill<kBytes>(slot0 + (i & (D - 1)) * kSlotStride, src + (real ? i : 0) * step,
                           real ? kBytes : 0);
    cp_async_commit();
  }
  __device__ __forceinline__ RawT take(int /*u*/, int i) {
    cp_async_wait<D - 1>();  // token i's copy (the oldest of the D pending) has landed
    RawT r;
    const unsigned at = slot0 + (i & (D - 1)) * kSlotStride;
    if constexpr (kBytes == 16) {
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3]) : "r"(at));
    } else if constexpr (kBytes == 8) {
      asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "r"(at));
    } else {
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r.w[0]) : "r"(at));
    }
    fetch(i + D);  // after the read: the copy overwrites the slot just read
    return r;
  }
  __device__ __forceinline__ void drain() const { cp_async_wait<0>(); }
};

template <typename T, int VEC, int D>
struct RegisterRing {
  using RawT = Raw<T, VEC>;
  static constexpr int kSharedBytes = 0;
  RawT buf[D];
  const T* __restrict__ src;
  TokenOffset<VEC> step;
  int last;  // count - 1

  __device__ __forceinline__ RegisterRing(unsigned char*, const T* src_, TokenOffset<VEC> step_,
                                          int count)
      : src(src_), step(step_), last(count - 1) {
#pragma unroll
    for (int u = 0; u < D; ++u) buf[u] = load_raw<T, VEC>(src + min(u, last) * step);
  }
  __device__ __forceinline__ RawT take(int u, int i) {
    const RawT r = buf[u];
    buf[u] = load_raw<T, VEC>(src + min(i + D, last) * step);
    return r;
  }
  __device__ __forceinline__ void drain() const {}
};

// Shared memory for kRings rings of type Ring (at least 16 bytes: no zero-size arrays).
template <class Ring, int kRings>
constexpr int kRingBytes = Ring::kSharedBytes * kRings > 16 ? Ring::kSharedBytes * kRings : 16;

// Shared-memory rings are kSharedRingDepth deep (forward: one ring, 8 KB a block at 8-byte packs;
// backward: two); register rings are one batch deep. 8 measured faster than 4, 16 and 32 (above).
constexpr int kSharedRingDepth = 8;
template <typename T, int VEC, int kBatchTokens>
using TokenRing = std::conditional_t<(Raw<T, VEC>::kBytes >= 4),
                                     SharedRing<T, VEC, kSharedRingDepth>,
                                     RegisterRing<T, VEC, kBatchTokens>>;

template <int W, int VEC>
__device__ __forceinline__ void load_params(const ConvParams& p, int64_t c0, float (&w)[W][VEC],
                                            float (&bias)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const int64_t c = c0 + v;
#pragma unroll
    for (int k = 0; k < W; ++k)
      w[k][v] = load_float(p.weight, p.param_dtype, c * p.weight_s[0] + k * p.weight_s[1]);
    bias[v] = p.bias ? load_float(p.bias, p.param_dtype, c * p.bias_s) : 0.f;
  }
}

// expf and an IEEE division, not __expf / __fdividef: fp32 results are held to 1e-6 of
// transformers', and bf16 ones to its rounding (torch's SiLU computes x / (1 + exp(-x))).
__device__ __forceinline__ float silu_f(float v) { return v / (1.f + expf(-v)); }

// silu_f(v) as far as its rounding to bf16 can tell, at half the instructions: 2^(-v log2 e) and
// the reciprocal from the special-function unit (MUFU.EX2, MUFU.RCP), then the exact silu_f only
// where that could round differently. For |v| < 32 the fast value is within 48 fp32 ulps of
// silu_f's (the product v log2 e, |v log2 e| < 64, is off by < 0.7 ulp = 2^-18.5: 2^-19 of
// relative error in the exponential, i.e. <= 32 ulps of the result; ex2.approx <= 4 ulps,
// rcp.approx <= 2, the sum and the product 1 each; silu_f's own expf, sum and division <= 6).
// bf16 rounding to nearest even turns on the low 16 bits of the fp32 value, its boundaries at
// 0x8000: a value more than 64 ulps from one rounds to the same bf16 as silu_f's. The exact
// path runs on ~0.2% of the elements (and for |v| >= 32).
__device__ __forceinline__ float silu_bf16_rounding(float v) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(v * -1.44269504088896341f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
  const float fast = v * r;
  const bool near_boundary = ((__float_as_uint(fast) + 64u) & 0xff80u) == 0x8000u;
  if (near_boundary || !(fabsf(v) < 32.f)) return silu_f(v);
  return fast;
}

// sigmoid(v) = 1 / (1 + expf(-v)): torch's expf, the reciprocal by MUFU.RCP and one Newton step
// (within one ulp of the IEEE division, at a third of its instructions). rcp.approx flushes
// reciprocals of d >= 2^126 to zero: those (v < -87) take the division.
__device__ __forceinline__ float sigmoid_f(float v) {
  const float d = 1.f + expf(-v);
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  r = fmaf(r, fmaf(-d, r, 1.f), r);
  if (!(d < 0x1p126f)) r = 1.f / d;
  return r;
}

// sigmoid(v) to ~2^-18 relative error for |v| < 64 (the rounding of v log2 e, < 0.7 ulp of a
// number < 93, is 2^-19 of relative error in the exponential; ex2.approx and rcp.approx add a
// few ulps; ~2^-21 for |v| < 8), from MUFU.EX2 and MUFU.RCP alone: for gradients rounded to
// bf16, where it moves a result across a rounding boundary for ~2 * 2^-21 / 2^-8 of the
// elements (~0.03%; the tests hold dx to one ulp of a dpre flip). The caller keeps |v| >= 64
// for sigmoid_f.
__device__ __forceinline__ float sigmoid_mufu(float v) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(v * -1.44269504088896341f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + e));
  return r;
}

// d silu(v) / dv = s (1 + v (1 - s)), s = sigmoid(v), as torch's silu_backward
__device__ __forceinline__ float silu_grad_of(float v, float s) {
  return s * (1.f + v * (1.f - s));
}

// silu'(v[k]) for the VEC channels of a token: for bf16 gradients (kFast) by sigmoid_mufu,
// unless some |v| >= 64 (or is inf): then, as for the others, by sigmoid_f. One test per
// token, not per element (NaN takes either path to a NaN).
template <bool kFast, int VEC>
__device__ __forceinline__ void silu_grads(const float (&v)[VEC], float (&g)[VEC]) {
  if constexpr (kFast) {
    float largest = 0.f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) largest = fmaxf(largest, fabsf(v[k]));
    if (largest < 64.f) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[k] = silu_grad_of(v[k], sigmoid_mufu(v[k]));
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) g[k] = silu_grad_of(v[k], sigmoid_f(v[k]));
}

// pre = bias + w[W-1] x[t] + sum_{j = 1}^{reach} w[W-1-j] x[t-j] (this order: the results
// the kernels gave before the rewrite, bit for bit), x[t - j] = hist[at - j]. `at` is a
// compile-time index once the token loops are unrolled: the history is a register array that
// is written once per token and shifted once per batch, not once per token.
template <int W, int VEC, int H>
__device__ __forceinline__ void convolve(const float (&w)[W][VEC], const float (&bias)[VEC],
                                         const float (&hist)[H][VEC], int at, int reach,
                                         float (&pre)[VEC]) {
  if (reach == W - 1) {  // all but the first W - 1 tokens of a sequence: no mask
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float acc = fmaf(w[W - 1][v], hist[at][v], bias[v]);
#pragma unroll
      for (int j = 1; j < W; ++j) acc = fmaf(w[W - 1 - j][v], hist[at - j][v], acc);
      pre[v] = acc;
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float acc = fmaf(w[W - 1][v], hist[at][v], bias[v]);
#pragma unroll
      for (int j = 1; j < W; ++j)
        if (j <= reach) acc = fmaf(w[W - 1 - j][v], hist[at - j][v], acc);
      pre[v] = acc;
    }
  }
}

// After a full batch of B tokens: the last W - 1 become the history of the next batch.
template <int W, int VEC, int H>
__device__ __forceinline__ void carry_history(float (&hist)[H][VEC]) {
#pragma unroll
  for (int k = 0; k < W - 1; ++k)
#pragma unroll
    for (int v = 0; v < VEC; ++v) hist[k][v] = hist[H - (W - 1) + k][v];
}

// ----------------------------------------------------------------------------- forward

template <typename T, int kRound, int W, int VEC, bool kSilu, bool kVarlen>
__device__ __forceinline__ void forward_run(const ConvParams& p, unsigned char* smem) {
  const int R = p.run_tokens;
  using RawT = Raw<T, VEC>;
  const int64_t b = blockIdx.z;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kChannelThreads + threadIdx.x) * VEC;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.y) * kRuns + threadIdx.y) * R;
  const int64_t t1 = min(t0 + R, p.seq_len);
  if (c0 >= p.channels || t0 >= t1) return;  // no barrier in this kernel

  // Bit e: token t0 - (W - 1) + e starts a sequence (e < R + W - 1). Without cu_seqlens there
  // are none, and the token loop carries no mask at all.
  const uint64_t starts = kVarlen ? sequence_starts(p, t0 - (W - 1), R + W - 1) : 0;
  float w[W][VEC], bias[VEC];
  load_params<W, VEC>(p, c0, w, bias);
  const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_s[0] + c0 * p.x_s[1];
  T* __restrict__ y = static_cast<T*>(p.out) + b * p.out_s[0] + c0 * p.out_s[1];
  const int64_t xt_s = p.x_s[2], yt_s = p.out_s[2];
  const TokenOffset<VEC> x_step = static_cast<TokenOffset<VEC>>(xt_s);

  // The run's tokens come through a ring (TokenRing), its first copies issued before the halo's
  // loads; token indices are relative to t0 (int).
  const int n = static_cast<int>(t1 - t0);
  const T* __restrict__ x_run = x + t0 * xt_s;
  TokenRing<T, VEC, kBatch> ring(smem, x_run, x_step, n);
  T* __restrict__ y_at = y + t0 * yt_s;  // token i

  // hist[W - 1 + u] = x[token i0 + u] of the current batch, hist[W - 1 - j] = x[token i0 - j]:
  // zeros before t = 0, masked by reach after a sequence start.
  float hist[kBatch + W - 1][VEC];
#pragma unroll
  for (int j = 1; j < W; ++j) {
    const RawT r = t0 - j >= 0 ? load_raw<T, VEC>(x + (t0 - j) * xt_s) : zero_raw<T, VEC>();
    unpack<T, kRound, VEC>(r, p.param_dtype, hist[W - 1 - j]);
  }

  // Token i = i0 + u of the batch (u a compile-time constant once unrolled).
  auto token = [&](const int u, const int i, const uint32_t batch_starts) {
    unpack<T, kRound, VEC>(ring.take(u, i), p.param_dtype, hist[W - 1 + u]);
    float out[VEC];
    const int reach = kVarlen ? reach_back<W>(batch_starts, u + W - 1) : W - 1;
    convolve<W, VEC>(w, bias, hist, W - 1 + u, reach, out);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if constexpr (kSilu) {
        // transformers: the convolution's result in weight's dtype, SiLU in fp32, rounded
        const float pre = round_param<kRound>(p.param_dtype, out[v]);
        if constexpr (std::is_same_v<T, __nv_bfloat16> &&
                      (kRound == kRoundBF16 || kRound == kRoundNone)) {
          out[v] = silu_bf16_rounding(pre);  // only its bf16 rounding is stored
        } else {
          out[v] = silu_f(pre);
        }
      }
      if constexpr (!kRoundIsFree<T, kRound>) {
        out[v] = round_param<kRound>(p.param_dtype, out[v]);
      }
    }
    store_pack<T, VEC>(y_at, out);
    y_at += yt_s;
  };
  // Whole batches without a per-token exit test (a conditional exit after every token made the
  // compiler copy the ring and the pointers around it), then the run's partial batch, if any.
  int i0 = 0;
#pragma unroll 1
  for (; i0 + kBatch <= n; i0 += kBatch) {
    const uint32_t batch_starts = static_cast<uint32_t>(starts >> i0);  // bit u + W - 1: token i
#pragma unroll
    for (int u = 0; u < kBatch; ++u) token(u, i0 + u, batch_starts);
    carry_history<W, VEC>(hist);
  }
  if (i0 < n) {
    const uint32_t batch_starts = static_cast<uint32_t>(starts >> i0);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (i0 + u >= n) break;
      token(u, i0 + u, batch_starts);
    }
  }
  ring.drain();
}

template <typename T, int kRound, int W, int VEC>
__global__ void __launch_bounds__(kThreads, 4) causal_conv1d_forward_kernel(const ConvParams p) {
  __shared__ alignas(16) unsigned char ring_smem[kRingBytes<TokenRing<T, VEC, kBatch>, 1>];
  // Four bodies: the SiLU and the sequence masks are compile-time in the token loop.
  if (p.cu_seqlens != nullptr) {
    if (p.silu) forward_run<T, kRound, W, VEC, true, true>(p, ring_smem);
    else forward_run<T, kRound, W, VEC, false, true>(p, ring_smem);
  } else {
    if (p.silu) forward_run<T, kRound, W, VEC, true, false>(p, ring_smem);
    else forward_run<T, kRound, W, VEC, false, false>(p, ring_smem);
  }
}

// ----------------------------------------------------------------------------- backward

template <typename T, int kRound, int W, int VEC, bool kSilu, bool kVarlen>
__device__ __forceinline__ void backward_run(const ConvParams& p, float (&dw)[W + 1][VEC],
                                             unsigned char* smem) {
  const int R = p.run_tokens;
  using RawT = Raw<T, VEC>;
  const int64_t b = blockIdx.z;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kChannelThreads + threadIdx.x) * VEC;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.y) * kRuns + threadIdx.y) * R;
  const int64_t t1 = min(t0 + R, p.seq_len);
  if (c0 >= p.channels || t0 >= t1) return;

  // Bit e: token t0 - (W - 1) + e starts a sequence (the run, its halo and its look-ahead).
  const uint64_t starts = kVarlen ? sequence_starts(p, t0 - (W - 1), R + 2 * (W - 1)) : 0;
  float w[W][VEC], bias[VEC];
  load_params<W, VEC>(p, c0, w, bias);
  const T* __restrict__ x = static_cast<const T*>(p.x) + b * p.x_s[0] + c0 * p.x_s[1];
  const T* __restrict__ dy = static_cast<const T*>(p.dy) + b * p.dy_s[0] + c0 * p.dy_s[1];
  T* __restrict__ dx = static_cast<T*>(p.out) + b * p.out_s[0] + c0 * p.out_s[1];
  const int64_t xt_s = p.x_s[2], dyt_s = p.dy_s[2], dxt_s = p.out_s[2];
  const TokenOffset<VEC> x_step = static_cast<TokenOffset<VEC>>(xt_s);
  const TokenOffset<VEC> dy_step = static_cast<TokenOffset<VEC>>(dyt_s);

  // Histories as in the forward: hx[W - 1 + u] = x[token i0 + u], hx[W - 1 - j] = x[token
  // i0 - j] (unmasked: the weight gradient reads it), hdp the same for dpre.
  constexpr int H = kBackwardBatch + W - 1;
  float hx[H][VEC], hdp[H][VEC];
#pragma unroll
  for (int j = 1; j < W; ++j) {
    const RawT r = t0 - j >= 0 ? load_raw<T, VEC>(x + (t0 - j) * xt_s) : zero_raw<T, VEC>();
    unpack<T, kRound, VEC>(r, p.param_dtype, hx[W - 1 - j]);
#pragma unroll
    for (int v = 0; v < VEC; ++v) hdp[W - 1 - j][v] = 0.f;  // dpre before t0: never emitted
  }

  // Tokens t0 .. t0 + n_stop - 1: dx[t1 - 1] needs dpre up to t1 - 1 + W - 1. Past T, x = dy = 0
  // (then dpre = 0: the zero look-ahead the end of the last sequence needs). Token indices are
  // relative to t0 (int); the pointers advance by one token per step.
  const int n_stop = static_cast<int>(t1 - t0) + W - 1;
  const int n_load = static_cast<int>(min(t1 + W - 1, p.seq_len) - t0);
  // Rings of the next tokens of x and dy (TokenRing); past T the consumer substitutes zeros.
  const T* __restrict__ x_run = x + t0 * xt_s;
  const T* __restrict__ dy_run = dy + t0 * dyt_s;
  using Ring = TokenRing<T, VEC, kBackwardBatch>;
  Ring ring_x(smem, x_run, x_step, n_load);
  Ring ring_dy(smem + Ring::kSharedBytes, dy_run, dy_step, n_load);
  T* __restrict__ dx_at = dx + t0 * dxt_s;  // token i - (W - 1), once >= 0

  // Token i = i0 + u of the batch (u a compile-time constant once unrolled).
  auto token = [&](const int u, const int i, const uint32_t batch_starts) {
    RawT cur_x = ring_x.take(u, i), cur_dy = ring_dy.take(u, i);
    if (i >= n_load) cur_x = cur_dy = zero_raw<T, VEC>();  // past T (warp-uniform)
    const int e = u + W - 1;  // token i's bit in `batch_starts`
    float (&dp)[VEC] = hdp[W - 1 + u];
    unpack<T, kRound, VEC>(cur_x, p.param_dtype, hx[W - 1 + u]);
    unpack<T, kRound, VEC>(cur_dy, p.param_dtype, dp);  // dy in weight's dtype
    if constexpr (kSilu) {
      float pre[VEC];
      const int reach = kVarlen ? reach_back<W>(batch_starts, e) : W - 1;
      convolve<W, VEC>(w, bias, hx, W - 1 + u, reach, pre);
#pragma unroll
      for (int v = 0; v < VEC; ++v) pre[v] = round_param<kRound>(p.param_dtype, pre[v]);
      // bf16 dpre (or unrounded dpre and bf16 dx): the MUFU sigmoid, its error ~2^-13 of a bf16
      // ulp for |v| < 8; fp16 (an ulp 8x finer) and fp32: torch's expf
      constexpr bool kFastSigmoid = std::is_same_v<T, __nv_bfloat16> &&
                                    (kRound == kRoundBF16 || kRound == kRoundNone);
      float sg[VEC];
      silu_grads<kFastSigmoid, VEC>(pre, sg);
#pragma unroll
      for (int v = 0; v < VEC; ++v) dp[v] = round_param<kRound>(p.param_dtype, dp[v] * sg[v]);
    }
    // Emit token te = i - (W - 1): taps j = 0 .. ahead see dpre[te + j] of te's sequence.
    if (i >= W - 1) {  // te = i - (W - 1)
      const int ahead = kVarlen ? reach_ahead<W>(batch_starts, e - (W - 1)) : W - 1;
      // dpre[te + j] = hdp[u + j]; zero past te's sequence
      float d[W][VEC];
#pragma unroll
      for (int j = 0; j < W; ++j)
#pragma unroll
        for (int v = 0; v < VEC; ++v) d[j][v] = hdp[u + j][v];
      if (ahead < W - 1) {  // a sequence starts within te's look-ahead (varlen only)
#pragma unroll
        for (int j = 1; j < W; ++j)
          if (j > ahead)
#pragma unroll
            for (int v = 0; v < VEC; ++v) d[j][v] = 0.f;
      }
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        // dx[te] = sum_j weight[W - 1 - j] dpre[te + j], j from W - 1 down (the old order)
        float acc = w[0][v] * d[W - 1][v];
#pragma unroll
        for (int j = W - 2; j >= 0; --j) acc = fmaf(w[W - 1 - j][v], d[j][v], acc);
        out[v] = acc;
        if constexpr (!kRoundIsFree<T, kRound>) out[v] = round_param<kRound>(p.param_dtype, acc);
        // dweight[W - 1 - j] += x[te] dpre[te + j]; x[te] = hx[u]
        const float xe = hx[u][v];
        dw[W][v] += d[0][v];
#pragma unroll
        for (int j = 0; j < W; ++j) dw[W - 1 - j][v] = fmaf(xe, d[j][v], dw[W - 1 - j][v]);
      }
      store_pack<T, VEC>(dx_at, out);
      dx_at += dxt_s;
    }
  };
  // Whole batches without a per-token exit test, then the partial one (as in the forward).
  int i0 = 0;
#pragma unroll 1
  for (; i0 + kBackwardBatch <= n_stop; i0 += kBackwardBatch) {
    const uint32_t batch_starts = static_cast<uint32_t>(starts >> i0);  // bit u + W - 1: token i
#pragma unroll
    for (int u = 0; u < kBackwardBatch; ++u) token(u, i0 + u, batch_starts);
    carry_history<W, VEC>(hx);
    carry_history<W, VEC>(hdp);
  }
  if (i0 < n_stop) {
    const uint32_t batch_starts = static_cast<uint32_t>(starts >> i0);
#pragma unroll
    for (int u = 0; u < kBackwardBatch; ++u) {
      if (i0 + u >= n_stop) break;
      token(u, i0 + u, batch_starts);
    }
  }
  ring_x.drain();
  ring_dy.drain();
}

template <typename T, int kRound, int W, int VEC>
__global__ void __launch_bounds__(kThreads, 3) causal_conv1d_backward_kernel(const ConvParams p) {
  constexpr int kTileChannels = kChannelThreads * VEC;
  __shared__ float block_sums[kRuns][W + 1][kTileChannels];
  __shared__ alignas(16) unsigned char ring_smem[kRingBytes<TokenRing<T, VEC, kBackwardBatch>, 2>];
  float dw[W + 1][VEC];  // taps 0 .. W - 1, then the bias
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw[k][v] = 0.f;
  if (p.cu_seqlens != nullptr) {
    if (p.silu) backward_run<T, kRound, W, VEC, true, true>(p, dw, ring_smem);
    else backward_run<T, kRound, W, VEC, false, true>(p, dw, ring_smem);
  } else {
    if (p.silu) backward_run<T, kRound, W, VEC, true, false>(p, dw, ring_smem);
    else backward_run<T, kRound, W, VEC, false, false>(p, dw, ring_smem);
  }

  allow_dependents();  // the column sums' blocks may take the SMs (they wait for the partials)
  // Weight and bias gradients: the block's 4 runs in a fixed order, one partial per tile.
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int v = 0; v < VEC; ++v) block_sums[threadIdx.y][k][threadIdx.x * VEC + v] = dw[k][v];
  __syncthreads();
  const int64_t b = blockIdx.z;
  const int64_t tile_c0 = static_cast<int64_t>(blockIdx.x) * kTileChannels;
  float* partial = p.partials + (b * p.num_tiles + blockIdx.y) * (W + 1) * p.channels;
  for (int i = threadIdx.y * kChannelThreads + threadIdx.x; i < (W + 1) * kTileChannels;
       i += kThreads) {
    const int k = i / kTileChannels, cl = i % kTileChannels;
    if (tile_c0 + cl >= p.channels) continue;
    float s = 0.f;
#pragma unroll
    for (int run = 0; run < kRuns; ++run) s += block_sums[run][k][cl];
    partial[k * p.channels + tile_c0 + cl] = s;
  }
}

// dweight[c, k] (k < W) and dbias[c] (k = W): column j = k C + c of the partials [P, W + 1, C]
// of all (b, tile), summed by column_sums.cuh in a fixed order.
struct StoreConvGradients {
  int64_t channels;
  int width;
  void* dweight;
  void* dbias;  // nullptr: no bias
  DType param_dtype;
  int64_t dweight_s[2], dbias_s;

  __device__ void operator()(int64_t j, float sum) const {
    const int64_t k = j / channels, c = j % channels;
    if (k < width) {
      store_float(dweight, param_dtype, c * dweight_s[0] + k * dweight_s[1], sum);
    } else if (dbias) {
      store_float(dbias, param_dtype, c * dbias_s, sum);
    }
  }
};

// ----------------------------------------------------------------------------- decode update

struct UpdateParams {
  const void* x;
  void* y;
  void* state;
  const void* weight;
  const void* bias;
  DType param_dtype, state_dtype;
  int64_t x_s[3], y_s[3], state_s[3], weight_s[2], bias_s;
  int64_t batch, channels, new_tokens, state_len;
  bool silu;
};

// y = act(bias + sum_k w[k] col[5 - W + k]) over the 5 columns (4 state + 1 new) of one
// channel, rounded as transformers rounds (the convolution in weight's dtype).
template <int W>
__device__ __forceinline__ float decode_output(const UpdateParams& p, int64_t c,
                                               const float (&col)[5]) {
  float acc = p.bias ? load_float(p.bias, p.param_dtype, c * p.bias_s) : 0.f;
#pragma unroll
  for (int k = 0; k < W; ++k)
    acc = fmaf(load_float(p.weight, p.param_dtype, c * p.weight_s[0] + k * p.weight_s[1]),
               col[5 - W + k], acc);
  acc = round_to(p.param_dtype, acc);
  return p.silu ? round_to(p.param_dtype, silu_f(acc)) : acc;
}

// The decode case: L = 1, S = 4, conv_state [B, C, 4] in x's dtype with rows of adjacent
// channels adjacent (row stride 4) and 16-byte aligned. A thread owns kRows channels, i.e.
// 16 bytes of state: one load and one store of it.
template <typename T, int W>
__global__ void __launch_bounds__(256) causal_conv1d_update_rows_kernel(const UpdateParams p) {
  constexpr int kRows = 16 / (4 * static_cast<int>(sizeof(T)));  // 2 (16-bit), 1 (fp32)
  const int64_t groups = p.channels / kRows;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * groups) return;
  const int64_t b = i / groups, c0 = (i % groups) * kRows;  // adjacent threads: adjacent rows
  T* rows = static_cast<T*>(p.state) + b * p.state_s[0] + c0 * 4;
  const Pack<T, 4 * kRows> old = *reinterpret_cast<const Pack<T, 4 * kRows>*>(rows);
  const T* x = static_cast<const T*>(p.x) + b * p.x_s[0] + c0 * p.x_s[1];
  T* y = static_cast<T*>(p.y) + b * p.y_s[0] + c0 * p.y_s[1];
  Pack<T, 4 * kRows> next;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    // Columns of concat(conv_state, x) in weight's dtype, as transformers concatenates and
    // casts before both the convolution and the state update.
    float col[5];
#pragma unroll
    for (int j = 0; j < 4; ++j) col[j] = round_to(p.param_dtype, to_f32(old.v[4 * r + j]));
    col[4] = round_to(p.param_dtype, to_f32(x[r * p.x_s[1]]));
    y[r * p.y_s[1]] = from_f32<T>(decode_output<W>(p, c0 + r, col));
#pragma unroll
    for (int j = 0; j < 4; ++j) next.v[4 * r + j] = from_f32<T>(col[j + 1]);
  }
  *reinterpret_cast<Pack<T, 4 * kRows>*>(rows) = next;
}

// Any L, S >= W - 1, any strides and state dtype: one thread per (b, c).
template <typename T, int W>
__global__ void __launch_bounds__(256) causal_conv1d_update_kernel(const UpdateParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.channels) return;
  const int64_t b = i / p.channels, c = i % p.channels;  // adjacent threads: adjacent channels
  const int64_t S = p.state_len, L = p.new_tokens;
  const T* x = static_cast<const T*>(p.x) + b * p.x_s[0] + c * p.x_s[1];
  T* y = static_cast<T*>(p.y) + b * p.y_s[0] + c * p.y_s[1];
  const int64_t state_base = b * p.state_s[0] + c * p.state_s[1];
  auto column = [&](int64_t j) {  // column j of concat(conv_state, x), in weight's dtype
    return round_to(p.param_dtype,
                    j < S ? load_float(p.state, p.state_dtype, state_base + j * p.state_s[2])
                          : to_f32(x[(j - S) * p.x_s[2]]));
  };
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k)
    w[k] = load_float(p.weight, p.param_dtype, c * p.weight_s[0] + k * p.weight_s[1]);
  const float bias = p.bias ? load_float(p.bias, p.param_dtype, c * p.bias_s) : 0.f;
  for (int64_t l = 0; l < L; ++l) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc = fmaf(w[k], column(S - W + 1 + l + k), acc);
    acc = round_to(p.param_dtype, acc);
    y[l * p.y_s[2]] = from_f32<T>(p.silu ? round_to(p.param_dtype, silu_f(acc)) : acc);
  }
  for (int64_t j = 0; j < S; ++j)
    store_float(p.state, p.state_dtype, state_base + j * p.state_s[2], column(L + j));
}

// ----------------------------------------------------------------------------- host side

void copy_strides(const TensorRef& t, int64_t* dst) {
  for (int d = 0; d < t.rank; ++d) dst[d] = t.strides[d];
}

// Packs of `vec` channels need channel stride 1, the other strides multiples of vec elements (a
// dimension of size 1 has no stride that matters), C % vec == 0, an address aligned to the pack,
// and a token stride the 32-bit run offsets take.
bool packable(const TensorRef& t, int vec) {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  if (addr % (vec * dtype_size(t.dtype)) != 0 || t.shape[1] % vec != 0) return false;
  if (t.shape[1] > 1 && t.strides[1] != 1) return false;
  if (t.strides[2] >= kMaxPackedTokenStride || t.strides[2] <= -kMaxPackedTokenStride) return false;
  for (int d : {0, 2})
    if (t.shape[d] > 1 && t.strides[d] % vec != 0) return false;
  return true;
}

void fill_common(ConvParams& p, const CausalConv1dShape& s, const CausalConv1dInputs& in) {
  p.x = in.x.data;
  p.weight = in.weight.data;
  p.bias = in.bias.defined() ? in.bias.data : nullptr;
  p.param_dtype = in.weight.dtype;
  copy_strides(in.x, p.x_s);
  copy_strides(in.weight, p.weight_s);
  p.bias_s = in.bias.defined() ? in.bias.strides[0] : 0;
  p.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data : nullptr;
  p.cu_seqlens_64 = in.cu_seqlens.defined() && in.cu_seqlens.dtype == DType::kInt64;
  p.cu_seqlens_stride = in.cu_seqlens.defined() ? in.cu_seqlens.strides[0] : 1;
  p.num_offsets = in.cu_seqlens.defined() ? in.cu_seqlens.shape[0] : 0;
  p.channels = s.channels;
  p.seq_len = s.seq_len;
  p.silu = in.silu;
}

int64_t num_tiles(int64_t seq_len, int run_tokens) {
  const int64_t tile = static_cast<int64_t>(kRuns) * run_tokens;
  return (seq_len + tile - 1) / tile;
}

void check_grid(const CausalConv1dShape& s, int64_t tiles, const char* op) {
  check_value(tiles <= kMaxGridYZ, op, ": the CUDA kernels take T <= ",
              kMaxGridYZ * static_cast<int64_t>(kRuns) * kForwardRunTokens, " tokens, got T = ",
              s.seq_len);
  check_value(s.batch <= kMaxGridYZ, op, ": the CUDA kernels take B <= ", kMaxGridYZ,
              ", got B = ", s.batch);
}

template <int V>
using Int = std::integral_constant<int, V>;
struct F32 { using type = float; static constexpr int kRound = kRoundNone; };
struct F16 { using type = __half; static constexpr int kRound = kRoundF16; };
struct BF16 { using type = __nv_bfloat16; static constexpr int kRound = kRoundBF16; };

struct ForwardKernel {
  static constexpr int kRunTokens = kForwardRunTokens;
  static constexpr bool kLongRuns = false;  // measured slower with longer runs (below)
  template <typename T, int kRound, int W, int VEC>
  static auto function() { return causal_conv1d_forward_kernel<T, kRound, W, VEC>; }
};
struct BackwardKernel {
  static constexpr int kRunTokens = kBackwardRunTokens;
  static constexpr bool kLongRuns = true;
  template <typename T, int kRound, int W, int VEC>
  static auto function() { return causal_conv1d_backward_kernel<T, kRound, W, VEC>; }
};

// Tokens per run of the backward without cu_seqlens: as many as put the grid in one wave of
// resident blocks, between the default and max_run. Longer runs mean fewer weight-gradient
// partials and less halo, and one wave means no block waits for a slot and the grid ends with
// every SM busy. H100, 8192 channels, fwd + bwd (graph replay, session 11): 1 x 8192 302.5 ->
// 298.0 us (runs 63 -> 256: 4 whole waves -> 0.97 of one), 8 x 4096 1011.2 -> 1001.2 us (runs 57
// -> 256: 17.5 waves -> 3.9; no single wave is in reach there). (Session 5 balanced the runs to
// whole waves, up to twice the default.) The forward measured the other way, longer or shorter
// runs alike (1 x 8192: 112.5 us at 32 tokens; 113.7 at 24, 119.5 at 16, 116.6 at 48, 135.4 at
// 144) and keeps its runs. Longer runs only ever reduce the tile count, so the workspace, sized
// for the default, always suffices. With cu_seqlens the runs keep the default: the
// sequence-start mask covers a run and its halos in 64 bits.
int backward_run_tokens(int64_t seq_len, int64_t rows, int64_t resident, int max_run) {
  const int64_t tiles = std::max<int64_t>(1, resident / rows);  // token tiles a row, one wave
  const int64_t run = (seq_len + kRuns * tiles - 1) / (kRuns * tiles);
  return static_cast<int>(std::clamp<int64_t>(run, kBackwardRunTokens, max_run));
}

// The longest backward run whose token offsets stay 32-bit (TokenOffset): a run reads its tokens
// and W - 1 beyond them, the token stride apart (the largest of x's, dy's and dx's).
int max_backward_run(const ConvParams& p) {
  const int64_t stride = std::max({std::abs(p.x_s[2]), std::abs(p.dy_s[2]), std::abs(p.out_s[2]),
                                   int64_t{1}});
  const int64_t fit = ((int64_t{1} << 31) - 1) / stride - (kCausalConv1dCudaMaxWidth - 1);
  return static_cast<int>(std::clamp<int64_t>(fit, kBackwardRunTokens, kMaxBackwardRunTokens));
}

// Launches Kernel<T, kRound, W, VEC> with p's run length and tile count set (returns the tile
// count). The fast instantiations: the model's case (W = 4, packs of
// channels, weight in x's dtype or fp32). Everything else (W < 4, other strides, dtype mixes):
// VEC = 1 with the rounding dtype read at run time. 14 kernels per direction.
template <class Kernel, int kPackBytes>
int64_t dispatch(ConvParams p, DType x_dtype, int64_t width, bool packed, int64_t batch,
                 cudaStream_t stream) {
  auto go = [&](auto type_tag, auto round_tag, auto width_tag, auto vec_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int VEC = decltype(vec_tag)::value;
    const auto kernel = Kernel::template function<T, decltype(round_tag)::value,
                                                  decltype(width_tag)::value, VEC>();
    const int64_t channel_tiles =
        (p.channels + kChannelThreads * VEC - 1) / (kChannelThreads * VEC);
    p.run_tokens = Kernel::kRunTokens;
    if (Kernel::kLongRuns && p.cu_seqlens == nullptr) {
      p.run_tokens = backward_run_tokens(
          p.seq_len, channel_tiles * batch,
          resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, 0),
          max_backward_run(p));
    }
    p.num_tiles = num_tiles(p.seq_len, p.run_tokens);
    const dim3 grid(static_cast<unsigned>(channel_tiles), static_cast<unsigned>(p.num_tiles),
                    static_cast<unsigned>(batch));
    kernel<<<grid, dim3(kChannelThreads, kRuns), 0, stream>>>(p);
  };
  auto by_type = [&](auto type_tag) {
    using Tag = decltype(type_tag);
    constexpr int kVec = kPackBytes / static_cast<int>(sizeof(typename Tag::type));
    const bool weight_f32 = p.param_dtype == DType::kFloat32;
    if (packed && width == 4 && (weight_f32 || p.param_dtype == x_dtype)) {
      if (weight_f32) go(type_tag, Int<kRoundNone>{}, Int<4>{}, Int<kVec>{});
      else go(type_tag, Int<Tag::kRound>{}, Int<4>{}, Int<kVec>{});
      return;
    }
    switch (width) {
      case 2: go(type_tag, Int<kRoundRuntime>{}, Int<2>{}, Int<1>{}); break;
      case 3: go(type_tag, Int<kRoundRuntime>{}, Int<3>{}, Int<1>{}); break;
      default: go(type_tag, Int<kRoundRuntime>{}, Int<4>{}, Int<1>{}); break;
    }
  };
  switch (x_dtype) {
    case DType::kFloat32: by_type(F32{}); break;
    case DType::kFloat16: by_type(F16{}); break;
    case DType::kBFloat16: by_type(BF16{}); break;
    default: fail(Error::Kind::kType, "causal_conv1d: unsupported dtype on CUDA");
  }
  return p.num_tiles;
}

int pack_width(DType dtype, int pack_bytes) {
  return pack_bytes / static_cast<int>(dtype_size(dtype));
}

}  // namespace

size_t causal_conv1d_backward_workspace_bytes(const CausalConv1dShape& s) {
  return static_cast<size_t>(s.batch) * num_tiles(s.seq_len, kBackwardRunTokens) *
         (s.width + 1) * s.channels * sizeof(float);
}

void causal_conv1d_forward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                           const CausalConv1dForwardOutputs& out) {
  const char* op = "causal_conv1d";
  ConvParams p{};
  fill_common(p, s, in);
  p.out = out.y.data;
  copy_strides(out.y, p.out_s);
  p.num_tiles = num_tiles(s.seq_len, kForwardRunTokens);
  check_grid(s, p.num_tiles, op);
  if (s.batch == 0 || s.channels == 0 || s.seq_len == 0) return;
  const int vec = pack_width(in.x.dtype, kForwardPackBytes);
  const bool packed = packable(in.x, vec) && packable(out.y, vec);
  const DeviceGuard guard(in.x.device.index);
  dispatch<ForwardKernel, kForwardPackBytes>(p, in.x.dtype, s.width, packed, s.batch,
                                             static_cast<cudaStream_t>(in.stream));
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void causal_conv1d_backward(const CausalConv1dShape& s, const CausalConv1dInputs& in,
                            const CausalConv1dBackwardInputs& gin,
                            const CausalConv1dBackwardOutputs& gout) {
  const char* op = "causal_conv1d";
  ConvParams p{};
  fill_common(p, s, in);
  p.dy = gin.dy.data;
  copy_strides(gin.dy, p.dy_s);
  p.out = gout.dx.data;
  copy_strides(gout.dx, p.out_s);
  p.num_tiles = num_tiles(s.seq_len, kBackwardRunTokens);
  p.partials = gout.workspace.defined() ? static_cast<float*>(gout.workspace.data) : nullptr;
  check_grid(s, p.num_tiles, op);
  if (s.channels == 0) return;
  const DeviceGuard guard(in.x.device.index);
  const auto stream = static_cast<cudaStream_t>(in.stream);
  if (s.batch > 0 && s.seq_len > 0) {
    const int vec = pack_width(in.x.dtype, kBackwardPackBytes);
    const bool packed = packable(in.x, vec) && packable(gin.dy, vec) && packable(gout.dx, vec);
    p.num_tiles = dispatch<BackwardKernel, kBackwardPackBytes>(p, in.x.dtype, s.width, packed,
                                                               s.batch, stream);
    FLASHDELTA_CUDA_CHECK(cudaGetLastError());
  }
  StoreConvGradients store{};
  store.channels = s.channels;
  store.width = static_cast<int>(s.width);
  store.dweight = gout.dweight.data;
  store.dbias = gout.dbias.defined() ? gout.dbias.data : nullptr;
  store.param_dtype = gout.dweight.dtype;
  copy_strides(gout.dweight, store.dweight_s);
  store.dbias_s = gout.dbias.defined() ? gout.dbias.strides[0] : 0;
  launch_column_sums(p.partials, s.batch * p.num_tiles, (s.width + 1) * s.channels, store, stream);
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

void causal_conv1d_update(const CausalConv1dUpdateShape& s, const CausalConv1dUpdateArgs& a) {
  UpdateParams p{};
  p.x = a.x.data;
  p.y = a.y.data;
  p.state = a.conv_state.data;
  p.weight = a.weight.data;
  p.bias = a.bias.defined() ? a.bias.data : nullptr;
  p.param_dtype = a.weight.dtype;
  p.state_dtype = a.conv_state.dtype;
  copy_strides(a.x, p.x_s);
  copy_strides(a.y, p.y_s);
  copy_strides(a.conv_state, p.state_s);
  copy_strides(a.weight, p.weight_s);
  p.bias_s = a.bias.defined() ? a.bias.strides[0] : 0;
  p.batch = s.batch;
  p.channels = s.channels;
  p.new_tokens = s.new_tokens;
  p.state_len = s.state_len;
  p.silu = a.silu;
  if (s.batch * s.channels == 0) return;
  // The decode case: rows of 4 of x's dtype, row-adjacent channels, 16-byte groups of rows.
  const TensorRef& st = a.conv_state;
  const int64_t rows = 16 / (4 * static_cast<int64_t>(dtype_size(a.x.dtype)));
  const bool decode_rows =
      s.new_tokens == 1 && s.state_len == 4 && st.dtype == a.x.dtype && st.strides[2] == 1 &&
      (s.channels == 1 || st.strides[1] == 4) && s.channels % rows == 0 &&
      (s.batch == 1 || st.strides[0] % (4 * rows) == 0) &&
      reinterpret_cast<uintptr_t>(st.data) % 16 == 0;
  const int64_t threads = decode_rows ? s.batch * (s.channels / rows) : s.batch * s.channels;
  const unsigned blocks = static_cast<unsigned>((threads + 255) / 256);
  const DeviceGuard guard(a.x.device.index);
  const auto stream = static_cast<cudaStream_t>(a.stream);
  auto launch = [&](auto type_tag, auto width_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int W = decltype(width_tag)::value;
    if (decode_rows) causal_conv1d_update_rows_kernel<T, W><<<blocks, 256, 0, stream>>>(p);
    else causal_conv1d_update_kernel<T, W><<<blocks, 256, 0, stream>>>(p);
  };
  auto by_width = [&](auto type_tag) {
    switch (s.width) {
      case 2: launch(type_tag, Int<2>{}); break;
      case 3: launch(type_tag, Int<3>{}); break;
      default: launch(type_tag, Int<4>{}); break;
    }
  };
  switch (a.x.dtype) {
    case DType::kFloat32: by_width(F32{}); break;
    case DType::kFloat16: by_width(F16{}); break;
    case DType::kBFloat16: by_width(BF16{}); break;
    default: fail(Error::Kind::kType, "causal_conv1d_update: unsupported dtype on CUDA");
  }
  FLASHDELTA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace flashdelta::detail::cuda
