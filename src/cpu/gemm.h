// Small dense matrix products for the CPU backend (matrices of a few hundred rows at most,
// all resident in L1/L2).
//
//   gemm(C, A, B, alpha, accumulate):  C = alpha * op(A) op(B)  (+ C if accumulate)
//
// Matrices are row-major views; a transposed operand is a view with its strides swapped
// (Mat::t()). The kernel computes 4 rows x (64 bytes of columns) of C per step, broadcasting
// A's elements against rows of B, so B must have unit column stride: a transposed B is first
// copied into the caller's `pack` buffer (O(K N) against the product's O(M N K)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace flashdelta::cpu {

template <typename T>
struct Mat {
  T* p = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t rs = 0, cs = 1;  // row and column strides in elements

  Mat() = default;
  Mat(T* data, int64_t r, int64_t c) : p(data), rows(r), cols(c), rs(c), cs(1) {}
  Mat(T* data, int64_t r, int64_t c, int64_t row_stride)
      : p(data), rows(r), cols(c), rs(row_stride), cs(1) {}
  T& operator()(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
  T* row(int64_t i) const { return p + i * rs; }
  Mat t() const {
    Mat m = *this;
    std::swap(m.rows, m.cols);
    std::swap(m.rs, m.cs);
    return m;
  }
};

namespace detail {

// One MR x (NV vectors of 32 bytes) tile of C, accumulators in registers (GCC/Clang vector
// extension: compiles to AVX/AVX2 FMAs with -march=native, to SSE pairs otherwise).
template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T, int MR, int NV>
inline void gemm_tile(int64_t kdim, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                      int64_t b_rs, T* c, int64_t c_rs, T alpha, bool accumulate) {
  using V = typename Vec32<T>::type;
  constexpr int W = 32 / sizeof(T);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{} ;
  for (int64_t kk = 0; kk < kdim; ++kk) {
    const T* brow = b + kk * b_rs;
    V bv[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], brow + v * W, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * a_rs + kk * a_cs];
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      T* out = c + r * c_rs + v * W;
      V result = alpha * acc[r][v];
      if (accumulate) {
        V old;
        std::memcpy(&old, out, sizeof(V));
        result += old;
      }
      std::memcpy(out, &result, sizeof(V));
    }
  }
}

template <typename T>
inline void gemm_edge(int64_t mr, int64_t nr, int64_t kdim, const T* a, int64_t a_rs,
                      int64_t a_cs, const T* b, int64_t b_rs, T* c, int64_t c_rs, T alpha,
                      bool accumulate) {
  for (int64_t r = 0; r < mr; ++r) {
    for (int64_t j = 0; j < nr; ++j) {
      T acc = 0;
      for (int64_t kk = 0; kk < kdim; ++kk) acc += a[r * a_rs + kk * a_cs] * b[kk * b_rs + j];
      T& out = c[r * c_rs + j];
      out = alpha * acc + (accumulate ? out : T(0));
    }
  }
}

}  // namespace detail

// C (M x N, unit column stride) = alpha * A (M x K) * B (K x N) [+ C].
// `pack` must hold K * N elements when B's column stride is not 1.
template <typename T>
void gemm(const Mat<T>& C, const Mat<T>& A, const Mat<T>& B, T alpha, bool accumulate,
          T* pack) {
  constexpr int MR = 4;
  constexpr int NV = 2;                    // 32-byte vectors per tile row
  constexpr int NR = NV * 32 / sizeof(T);   // 16 floats or 8 doubles
  const int64_t M = C.rows, N = C.cols, K = A.cols;
  const T* b = B.p;
  int64_t b_rs = B.rs;
  if (B.cs != 1) {
    for (int64_t kk = 0; kk < K; ++kk)
      for (int64_t j = 0; j < N; ++j) pack[kk * N + j] = B(kk, j);
    b = pack;
    b_rs = N;
  }
  for (int64_t i0 = 0; i0 < M; i0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, M - i0);
    const T* a = A.p + i0 * A.rs;
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
      const int64_t nr = std::min<int64_t>(NR, N - j0);
      T* c = C.p + i0 * C.rs + j0;
      if (mr == MR && nr == NR) {
        detail::gemm_tile<T, MR, NV>(K, a, A.rs, A.cs, b + j0, b_rs, c, C.rs, alpha, accumulate);
      } else {
        detail::gemm_edge<T>(mr, nr, K, a, A.rs, A.cs, b + j0, b_rs, c, C.rs, alpha, accumulate);
      }
    }
  }
}

}  // namespace flashdelta::cpu
