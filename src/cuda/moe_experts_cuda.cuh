// Shared by moe_experts.cu and moe_experts_backward.cu: the alignment test that decides whether
// the grouped GEMM's loads may be 16-byte vectors (or TMA boxes), and the launcher that picks
// the GEMM path at run time:
//   sm90-wide  wgmma + TMA, 128 x 256 tiles, persistent (moe_grouped_gemm_sm90_wide.cuh);
//   sm90-128   wgmma + TMA, 128 x 128 tiles, one block a tile (moe_grouped_gemm_sm90.cuh);
//   sm80       mma.sync + cp.async (moe_grouped_gemm.cuh): every other case, and any shape.
// sm90-wide applies on Hopper devices, when this build has sm_90a code, the operands are
// TMA-compatible and the expert table fits in shared memory (E up to ~1400); sm90-128 on Hopper
// with TMA-compatible operands (the SwiGLU backward also needs gate_up TMA-compatible).
// FLASHDELTA_MOE_GEMM: unset or "auto" takes, per GEMM, the first that applies of
//   d_out W2 + SwiGLU backward: sm90-128, sm80;
//   the others (x W1 + SwiGLU, act W2, d_gate_up W1, dW2, dW1): sm90-wide, sm90-128, sm80.
// Measured per GEMM on the H100 (bench moe --profile, 2026-11-24 session 4, % of the matmul
// rate; x W1 + SwiGLU / d_out W2 + SwiGLU bwd / act W2 / d_gate_up W1 / dW2 / dW1):
//   sm90-128       49 / 41 / 44 / 52 / 36 / 37
//   sm90-wide      44 / 36 / 59 / 66 / 51 / 53
// Since then (session 5, not yet measured): both SwiGLU forward epilogues store through shared
// memory in whole rows (the wide one's register-layout stores were what held it below the
// plain-store GEMMs: auto now takes wide for x W1 + SwiGLU); sm90-wide's plain and SwiGLU
// forward epilogue blocks leave by TMA stores from two alternating staging buffers; sm90-128's
// SwiGLU backward has its gate_up tile loaded by TMA into the ring during the last k-steps. (A persistent
// 128 x 128 "ping-pong" kernel, its two consumer warpgroups alternating whole tiles, measured
// 42 / 35 / 50 / 61 / 47 / 49: slower than the best path on every GEMM; removed.)
// =sm80 forces the portable path; =sm90 demands a Hopper path (wide, else 128; an error on a
// device or build without sm_90a code; unaligned operands still take sm80); =sm90-wide and
// =sm90-128 (alias sm90-1cta) demand that kernel (where it does not apply: sm80);
// =sm90-wide-thread-stores is sm90-wide with every epilogue block stored by the threads instead
// of TMA (a measuring and testing switch: what the TMA stores gain, per GEMM, in one bench run);
// =sm90-2cta / sm90-4cta are sm90-128 in clusters of up to 2 or 4 blocks that multicast
// their shared operand (on the H100 they measured slower: 30-34% of the matmul rate against
// 35-47% without in session 3, and 5-20% slower per GEMM than sm90-128 in session 8 after the
// remote stage releases became CTA-scope, bench moe --profile: tuning and testing switches; the
// results are bitwise those of sm90-128).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/device_info.cuh"
#include "cuda/moe_grouped_gemm.cuh"
#include "cuda/moe_grouped_gemm_sm90.cuh"
#include "cuda/moe_grouped_gemm_sm90_wide.cuh"

namespace flashdelta::detail::cuda::moe {

// A 2-byte-element matrix can be read in 16-byte chunks when its base is 16-byte aligned and its
// leading dimension (and the per-expert stride) keep every row 16-byte aligned.
inline bool vector_friendly(const void* base, int64_t ld, int64_t expert_stride = 0) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && ld % 8 == 0 && expert_stride % 8 == 0;
}

enum class GemmPath {
  kAuto,
  kSm80,
  kSm90,
  kSm90Wide,
  kSm90WideThreadStores,
  kSm90Narrow,
  kSm90TwoCta,
  kSm90FourCta
};

// The Hopper kernel that auto tries first for a GEMM (the note above); sm90-128, then sm80, are
// the fallbacks of every GEMM. The six GEMMs by template arguments:
//   x W1 + SwiGLU            kRows, K-contiguous B, kSwiGLU
//   act W2                   kRows, K-contiguous B, kStore
//   d_out W2 + SwiGLU bwd    kRows, N-contiguous B, kSwiGLUBackward
//   d_gate_up W1             kRows, N-contiguous B, kStore
//   dW2, dW1                 kReduction,            kStore
template <Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
constexpr GemmPath auto_first_path() {
  if constexpr (kEpilogue == Epilogue::kSwiGLUBackward) {
    // Measured 41% against wide's 36%; since then only sm90-128 prefetches gate_up by TMA.
    return GemmPath::kSm90Narrow;
  } else {
    // Plain stores measured 51-66% of the matmul rate against 38-51% at 128; the SwiGLU forward
    // 44% against 49% before its staged stores (expected above 128 now: re-measure).
    return GemmPath::kSm90Wide;
  }
}

// FLASHDELTA_MOE_GEMM, read at every launch (a getenv: cheap, and tests may switch it).
inline GemmPath requested_gemm_path() {
  const char* v = std::getenv("FLASHDELTA_MOE_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return GemmPath::kAuto;
  if (std::strcmp(v, "sm80") == 0) return GemmPath::kSm80;
  if (std::strcmp(v, "sm90") == 0) return GemmPath::kSm90;
  if (std::strcmp(v, "sm90-wide") == 0) return GemmPath::kSm90Wide;
  if (std::strcmp(v, "sm90-wide-thread-stores") == 0) return GemmPath::kSm90WideThreadStores;
  if (std::strcmp(v, "sm90-128") == 0 || std::strcmp(v, "sm90-1cta") == 0) {
    return GemmPath::kSm90Narrow;
  }
  if (std::strcmp(v, "sm90-2cta") == 0) return GemmPath::kSm90TwoCta;
  if (std::strcmp(v, "sm90-4cta") == 0) return GemmPath::kSm90FourCta;
  throw Error(Error::Kind::kValue,
              std::string("FLASHDELTA_MOE_GEMM must be auto, sm80, sm90, sm90-wide, ") +
                  "sm90-wide-thread-stores, sm90-128, sm90-1cta, sm90-2cta or sm90-4cta, got '" +
                  v + "'");
}

// One grouped GEMM on `stream`, on the fastest path that applies (see the note above).
template <typename T, Grouping kGrouping, bool kBKContig, Epilogue kEpilogue>
void launch_grouped_gemm(const GroupedGemmParams<T>& p, cudaStream_t stream) {
  const GemmPath path = requested_gemm_path();
  constexpr GemmPath kAutoFirst = auto_first_path<kGrouping, kBKContig, kEpilogue>();
  const bool wide_only = path == GemmPath::kSm90Wide || path == GemmPath::kSm90WideThreadStores;
  const bool try_wide = (path == GemmPath::kAuto && kAutoFirst == GemmPath::kSm90Wide) ||
                        path == GemmPath::kSm90 || wide_only;
  const bool try_narrow = path != GemmPath::kSm80 && !wide_only;
  const bool demand_sm90 = path != GemmPath::kAuto && path != GemmPath::kSm80;
  const int max_cluster =
      path == GemmPath::kSm90FourCta ? 4 : (path == GemmPath::kSm90TwoCta ? 2 : 1);
  if (path != GemmPath::kSm80) {
    if (device_info().is_sm90) {
      if (try_wide &&
          sm90_wide::try_launch_grouped_gemm_sm90_wide<T, kGrouping, kBKContig, kEpilogue>(
              p, stream, path != GemmPath::kSm90WideThreadStores)) {
        return;
      }
      if (try_narrow && sm90::try_launch_grouped_gemm_sm90<T, kGrouping, kBKContig, kEpilogue>(
                            p, stream, max_cluster)) {
        return;
      }
      bool has_code;
      if (wide_only) {
        has_code = sm90_wide::wide_kernel_ready<T, kGrouping, kBKContig, kEpilogue>();
      } else {
        has_code = sm90::sm90_kernel_ready<T, kGrouping, kBKContig, kEpilogue>();
      }
      if (demand_sm90 && !has_code) {
        throw Error(Error::Kind::kNotImplemented,
                    "FLASHDELTA_MOE_GEMM=sm90*: this build has no sm_90a code for the grouped "
                    "GEMM (build with FLASHDELTA_CUDA_ARCHS containing 90a)");
      }
    } else if (demand_sm90) {
      throw Error(Error::Kind::kNotImplemented,
                  "FLASHDELTA_MOE_GEMM=sm90*: needs a compute capability 9.0 device (H100/H200)");
    }
  }
  launch_grouped_gemm_sm80<T, kGrouping, kBKContig, kEpilogue>(p, stream);
}

}  // namespace flashdelta::detail::cuda::moe
