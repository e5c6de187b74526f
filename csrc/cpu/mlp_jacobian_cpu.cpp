// CPU kernels of the MLP-Jacobian ops: the fused elementwise passes and reductions, the workspace
// and the tile loop; the GEMMs and the algorithms themselves live in ../mlp_jacobian.h and
// ../mlp_flow.h.
//
// Every pass loops over samples with at::parallel_for: on a whole batch (tile 0) it splits the
// samples over the threads; inside a tile it runs on the tile's thread alone (at::parallel_for does
// not nest), as do ATen's kernels and MKL's GEMMs called from it. The loops themselves are plain
// functions over raw pointers (the "inner loops" below), each compiled for AVX2 + FMA and for the
// baseline; inner loops run over the contiguous last dimension without branches, so that the
// compiler vectorizes them; sums accumulate in double (at::acc_type), as on CUDA.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../device_formulas.h"
#include "../mlp_flow.h"
#include "../mlp_jacobian.h"
#include "../workspace.h"
#include "common.h"

namespace jacext {
namespace {

constexpr int64_t kFewRows = 256, kSplitColumns = 512;  // CpuKernels::product
// rank_update_rows up to this k; MKL beyond (measured, 784 x 784 output: faster to k = 20)
constexpr int64_t kSmallRank = 16;
// small_product_nt for at most kSmallRows rows and at least kSmallDepth columns (measured against
// MKL, one thread: 10 x 784 x 784 in 0.8x, 22 x 784 x 256 in 0.9x, but 26 x 64 x 256 in 3.2x)
constexpr int64_t kSmallRows = 24, kSmallDepth = 256;

// ---------------------------------------------------------------------------------------------
// Inner loops. Each is a plain function over raw pointers and a range that at::parallel_for's
// chunks call, compiled twice: for x86-64-v3 (AVX2 + FMA, 8 floats an instruction) and for the
// baseline x86-64 the extension is built for (SSE2: 4, no FMA), the version picked when the
// library loads by what the CPU supports (GCC's target_clones, an ifunc). So the build stays
// portable (a wheel built here runs on any x86-64) and a modern CPU runs these loops at twice the
// width. The clone must be the innermost function: a parallel region's body is outlined before
// cloning and would keep the baseline.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define JACEXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define JACEXT_CPU_CLONES
#endif
// Helpers of the inner loops are always_inline, so that they are compiled into each clone (a call
// would run the baseline code).
#define JACEXT_INLINE __attribute__((always_inline)) inline

// The activation by the formulas of activations.h: h holds y on entry, act(y) on exit; d = act',
// d2 = act'' where given.
template <int64_t Code, typename T>
JACEXT_CPU_CLONES void activation_loop(T* h, T* d, T* d2, T p0, T p1, int64_t begin, int64_t end) {
  if (d2) {
    for (int64_t i = begin; i < end; ++i) {
      ActDerivs<T> r = activation_derivs<Code, T>(h[i], p0, p1);
      h[i] = r.value;
      d[i] = r.d1;
      d2[i] = r.d2;
    }
  } else {  // piecewise linear: no act''
    for (int64_t i = begin; i < end; ++i) {
      ActDerivs<T> r = activation_derivs<Code, T>(h[i], p0, p1);
      h[i] = r.value;
      d[i] = r.d1;
    }
  }
}

// tanh in float32 by jacext's own loop: ATen's float tanh (MKL's vector math) takes 4.4 ns an
// element on the AMD EPYC CI machine; this loop, with both derivatives, 1.3 ns (128 x 256, one
// thread). It stays within 1.33 ulp of the correctly rounded tanh over every float in [-12, 12]
// (ATen's: 0.51), by Cephes' tanhf: x + x^3 P(x^2) below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1)
// above, exp by Cephes' expf (2^n exp(r), r within ln(2) / 2 of 0). Both sides are computed and
// one is selected, without branches, so that it vectorizes (with -fno-trapping-math, setup.py).
// NaN propagates through the exp side; +-inf give +-1.
JACEXT_INLINE float tanh_float(float x) {
  const float z = x < 0 ? -x : x, z2 = x * x;
  float p = -5.70498872745e-3f;
  p = p * z2 + 2.06390887954e-2f;
  p = p * z2 - 5.37397155531e-2f;
  p = p * z2 + 1.33314422036e-1f;
  p = p * z2 - 3.33332819422e-1f;
  const float small = p * z2 * x + x;
  const float u = 2.0f * z > 88.0f ? 88.0f : 2.0f * z;  // tanh is 1 in float from |x| = 9.01 on
  const float n = (u * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(u / ln 2)
  const float r = (u - n * 0.693359375f) + n * 2.12194440e-4f;  // u - n ln 2 in two parts
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n > 0 ? n : 0) + 127) << 23;  // 2^n (n = 0 for NaN)
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float large = 1.0f - 2.0f / (e * two_n + 1.0f);
  return z < 0.625f ? small : x < 0 ? -large : large;
}

// h holds y on entry and tanh(y) on exit; d = tanh', d2 = tanh'' where given (as in activations.h).
JACEXT_CPU_CLONES void tanh_float_loop(float* h, float* d, float* d2, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float t = tanh_float(h[i]), s = 1.0f - t * t;
    h[i] = t;
    d[i] = s;
    if (d2) d2[i] = -2.0f * t * s;
  }
}

// tanh and sigmoid: both derivatives from the value v, as in activations.h:
// tanh' = 1 - t^2, tanh'' = -2 t tanh'; s' = s (1 - s), s'' = s' (1 - 2 s).
template <typename T>
JACEXT_CPU_CLONES void derivatives_from_value(const T* v, T* d, T* d2, bool is_tanh, int64_t begin, int64_t end) {
  if (is_tanh) {
    for (int64_t i = begin; i < end; ++i) {
      const T t = v[i], s = T(1) - t * t;
      d[i] = s;
      d2[i] = T(-2) * t * s;
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const T ds = v[i] * (T(1) - v[i]);
      d[i] = ds;
      d2[i] = ds * (T(1) - T(2) * v[i]);
    }
  }
}

// silu, softplus and smooth_leaky_relu from u (y, or beta y for softplus), sig = sigmoid(u) and
// tail = log1p(exp(-|u|)) (softplus(u) = max(u, 0) + tail): h holds y on entry (u may be h).
template <typename T>
JACEXT_CPU_CLONES void activation_from_sigmoid(const T* u, const T* sig, const T* tail, T* h, T* d, T* d2,
                                               int64_t code, T a, T threshold, int64_t begin, int64_t end) {
  if (code == kSiLU) {
    for (int64_t i = begin; i < end; ++i) {
      const T v = h[i], s = sig[i], ds = s * (T(1) - s);
      h[i] = v * s;
      d[i] = s + v * ds;
      d2[i] = ds * (T(2) + v * (T(1) - T(2) * s));
    }
  } else if (code == kSoftplus) {  // linear above beta y > threshold, as torch
    for (int64_t i = begin; i < end; ++i) {
      const T v = h[i], uv = u[i], s = sig[i], ds = s * (T(1) - s);
      const T softplus = (uv > T(0) ? uv : T(0)) + tail[i];
      const bool linear = uv > threshold;
      h[i] = linear ? v : softplus / a;
      d[i] = linear ? T(1) : s;
      d2[i] = linear ? T(0) : a * ds;
    }
  } else {  // smooth_leaky_relu: a y + (1 - a) softplus(y)
    for (int64_t i = begin; i < end; ++i) {
      const T v = h[i], uv = u[i], s = sig[i];
      const T softplus = (uv > T(0) ? uv : T(0)) + tail[i];
      h[i] = a * v + (T(1) - a) * softplus;
      d[i] = a + (T(1) - a) * s;
      d2[i] = (T(1) - a) * s * (T(1) - s);
    }
  }
}

// out[b,r,j] = c * x[b',r,j] * cols[b,j] * rows[b,r] * sample[b] for samples [b0, b1) (see
// CpuKernels::scale).
template <typename T>
JACEXT_CPU_CLONES void scale_samples(const T* x, int64_t x_stride, const T* cols, const T* rows, const T* sample,
                                     T c, T* out, int64_t R, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * x_stride;
    const T* cb = cols ? cols + b * N : nullptr;
    T* ob = out + b * R * N;
    const T factor = c * (sample ? sample[b] : T(1));
    for (int64_t r = 0; r < R; ++r) {
      const T f = rows ? factor * rows[b * R + r] : factor;
      const T* xr = xb + r * N;
      T* orow = ob + r * N;
      if (cb) {
        for (int64_t j = 0; j < N; ++j) orow[j] = xr[j] * cb[j] * f;
      } else {
        for (int64_t j = 0; j < N; ++j) orow[j] = xr[j] * f;
      }
    }
  }
}

// out[b] (or out[b, r] per row) = sum over j (and r) of a[b,r,j] * c[b',r,j] * cols[b,j]^2 for
// samples [b0, b1), accumulated in double (acc_t); `omp simd` lets the compiler split the sum into
// vector lanes (a fixed order for a given build).
template <typename T, typename Acc>
JACEXT_CPU_CLONES void reduce_product_samples(const T* a, int64_t a_stride, const T* c, int64_t c_stride, const T* cols,
                                              T* out, bool per_row, int64_t R, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const T* wb = cols ? cols + b * N : nullptr;
    Acc total = 0;
    for (int64_t r = 0; r < R; ++r) {
      const T* ar = a + b * a_stride + r * N;
      const T* cr = c + b * c_stride + r * N;
      Acc row = 0;
      if (wb) {
#pragma omp simd reduction(+ : row)
        for (int64_t j = 0; j < N; ++j) row += static_cast<Acc>(ar[j] * wb[j]) * (cr[j] * wb[j]);
      } else {
#pragma omp simd reduction(+ : row)
        for (int64_t j = 0; j < N; ++j) row += static_cast<Acc>(ar[j]) * cr[j];
      }
      if (per_row) out[b * R + r] = static_cast<T>(row);
      total += row;
    }
    if (!per_row) out[b] = static_cast<T>(total);
  }
}

// One row of rowwise_dot_scale_samples: a = x * cols * f, acc += r * a, out = a * d, the absent
// factors compiled out.
template <bool HasCols, bool HasD, bool HasAdjD, typename T, typename Acc>
JACEXT_INLINE void rowwise_dot_scale_row(const T* rrow, const T* xrow, const T* cb, T f, const T* db, T* orow,
                                         Acc* acc, int64_t N) {
  for (int64_t j = 0; j < N; ++j) {
    const T a = HasCols ? xrow[j] * cb[j] * f : xrow[j] * f;
    if (HasAdjD) acc[j] += static_cast<Acc>(rrow[j]) * a;
    orow[j] = HasD ? a * db[j] : a;
  }
}

// For samples [b0, b1): a[b,r,j] = c * x[b,r,j] * cols[b,j] * sample[b] (absent factors are 1),
// adj_d[b,j] = sum_r r[b',r,j] * a[b,r,j] (when adj_d is given), out[b,r,j] = a * d[b,j] (when d is
// given; else a). out may be x. acc: N accumulators.
template <typename T, typename Acc>
JACEXT_CPU_CLONES void rowwise_dot_scale_samples(const T* rr, int64_t r_stride, const T* x, const T* cols,
                                                 const T* sample, T c, const T* d, T* out, T* adj_d, Acc* acc,
                                                 int64_t R, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    if (adj_d) std::fill(acc, acc + N, Acc(0));
    const T* cb = cols ? cols + b * N : nullptr;
    const T* db = d ? d + b * N : nullptr;
    const T f = c * (sample ? sample[b] : T(1));
    for (int64_t row = 0; row < R; ++row) {
      const T* rrow = rr + b * r_stride + row * N;
      const T* xrow = x + (b * R + row) * N;
      T* orow = out + (b * R + row) * N;
      if (adj_d) {
        if (cb) {
          db ? rowwise_dot_scale_row<true, true, true>(rrow, xrow, cb, f, db, orow, acc, N)
             : rowwise_dot_scale_row<true, false, true>(rrow, xrow, cb, f, db, orow, acc, N);
        } else {
          db ? rowwise_dot_scale_row<false, true, true>(rrow, xrow, cb, f, db, orow, acc, N)
             : rowwise_dot_scale_row<false, false, true>(rrow, xrow, cb, f, db, orow, acc, N);
        }
      } else if (cb) {
        db ? rowwise_dot_scale_row<true, true, false>(rrow, xrow, cb, f, db, orow, acc, N)
           : rowwise_dot_scale_row<true, false, false>(rrow, xrow, cb, f, db, orow, acc, N);
      } else {
        db ? rowwise_dot_scale_row<false, true, false>(rrow, xrow, cb, f, db, orow, acc, N)
           : rowwise_dot_scale_row<false, false, false>(rrow, xrow, cb, f, db, orow, acc, N);
      }
    }
    if (adj_d) {
      for (int64_t j = 0; j < N; ++j) adj_d[b * N + j] = static_cast<T>(acc[j]);
    }
  }
}

// acc[r,j] += sum_{b < n} x[b,r,j] * cols[b,j] * rows[b,r] for the rows [r0, r1) of acc, the sum
// over b in double (sums: N accumulators).
template <typename T, typename Acc>
JACEXT_CPU_CLONES void batch_sum_rows(T* acc, const T* x, const T* cols, const T* rows, Acc* sums, int64_t n,
                                      int64_t R, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(sums, sums + N, Acc(0));
    for (int64_t b = 0; b < n; ++b) {
      const T* xr = x + (b * R + r) * N;
      const T f = rows ? rows[b * R + r] : T(1);
      if (cols) {
        const T* cb = cols + b * N;
        for (int64_t j = 0; j < N; ++j) sums[j] += static_cast<Acc>(xr[j] * cb[j] * f);
      } else {
        for (int64_t j = 0; j < N; ++j) sums[j] += static_cast<Acc>(xr[j] * f);
      }
    }
    T* ar = acc + r * N;
    for (int64_t j = 0; j < N; ++j) ar[j] = static_cast<T>(ar[j] + sums[j]);
  }
}

// g = grad_h * d + adj_d * d2 for samples [b0, b1) (absent terms left out; an absent d is 1).
template <typename T>
JACEXT_CPU_CLONES void mlp_delta_samples(const T* grad_h, const T* d, const T* adj_d, const T* d2, T* g, int64_t N,
                                         int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* gb = g + b * N;
    const int64_t o = b * N;
    if (grad_h && d) {
      for (int64_t j = 0; j < N; ++j) gb[j] = grad_h[o + j] * d[o + j];
    } else if (grad_h) {
      for (int64_t j = 0; j < N; ++j) gb[j] = grad_h[o + j];
    } else {
      for (int64_t j = 0; j < N; ++j) gb[j] = T(0);
    }
    if (adj_d && d2) {
      for (int64_t j = 0; j < N; ++j) gb[j] += adj_d[o + j] * d2[o + j];
    }
  }
}

// out[j] += sum_{b < n} g[b, j] for the columns [j0, j1), in double (sums: j1 - j0 accumulators).
template <typename T, typename Acc>
JACEXT_CPU_CLONES void column_sums(T* out, const T* g, Acc* sums, int64_t n, int64_t N, int64_t j0, int64_t j1) {
  std::fill(sums, sums + (j1 - j0), Acc(0));
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t j = j0; j < j1; ++j) sums[j - j0] += g[b * N + j];
  }
  for (int64_t j = j0; j < j1; ++j) out[j] = static_cast<T>(out[j] + sums[j - j0]);
}

// Register-blocked loops use GCC's vector extensions: Vec<T> is 32 bytes (one AVX2 register in
// the x86-64-v3 clone, two SSE2 registers in the baseline one); loads and stores need no alignment.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32), aligned(4), may_alias));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32), aligned(8), may_alias));
};
template <typename T>
using Vec = typename Simd<T>::type;
template <typename T>
constexpr int kLanes = 32 / static_cast<int>(sizeof(T));
template <typename T>
JACEXT_INLINE Vec<T> load(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T>
JACEXT_INLINE void store(T* p, Vec<T> v) {
  *reinterpret_cast<Vec<T>*>(p) = v;
}
template <typename T>
JACEXT_INLINE Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

// The MR x NR block out[i, n] = bias[n] + a_i . w_n (rows of a and of w, K long) of small_product_nt,
// one vector of partial sums each.
template <typename T, int MR, int NR>
JACEXT_INLINE void dot_block(T* out, int64_t ldo, const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias,
                             int64_t K) {
  constexpr int V = kLanes<T>;
  Vec<T> acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) acc[r][c] = Vec<T>{};
  }
  int64_t k = 0;
  for (; k + V <= K; k += V) {
    Vec<T> wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = load(w + c * ldw + k);
    for (int r = 0; r < MR; ++r) {
      const Vec<T> av = load(a + r * lda + k);
      for (int c = 0; c < NR; ++c) acc[r][c] += av * wv[c];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      T sum = bias ? bias[c] : T(0);
      for (int l = 0; l < V; ++l) sum += acc[r][c][l];
      for (int64_t kk = k; kk < K; ++kk) sum += a[r * lda + kk] * w[c * ldw + kk];
      out[r * ldo + c] = sum;
    }
  }
}

// NR columns of small_product_nt for every row of a: rows of a four at a time.
template <typename T, int NR>
JACEXT_INLINE void dot_columns(T* out, int64_t ldo, const T* a, int64_t lda, const T* w, int64_t ldw, const T* bias,
                               int64_t M, int64_t K) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dot_block<T, 4, NR>(out + i * ldo, ldo, a + i * lda, lda, w, ldw, bias, K);
  for (; i + 2 <= M; i += 2) dot_block<T, 2, NR>(out + i * ldo, ldo, a + i * lda, lda, w, ldw, bias, K);
  for (; i < M; ++i) dot_block<T, 1, NR>(out + i * ldo, ldo, a + i * lda, lda, w, ldw, bias, K);
}

// out[i, n] = bias[n] + sum_k a[i, k] w[n, k] for the columns [n0, n1): x W^T + b for a batch of
// few rows (a flow at a small batch), as dot products of contiguous rows, blocks of 4 rows of a by
// 3 rows of w. MKL runs these below its rate (measured, 10 x 784 x 784, one thread: 0.20 ms here,
// 0.25 ms by MKL).
template <typename T>
JACEXT_CPU_CLONES void small_product_nt(T* out, int64_t ldo, const T* a, int64_t lda, const T* w, int64_t ldw,
                                        const T* bias, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) {
    dot_columns<T, 3>(out + n, ldo, a, lda, w + n * ldw, ldw, bias ? bias + n : nullptr, M, K);
  }
  for (; n < n1; ++n) dot_columns<T, 1>(out + n, ldo, a, lda, w + n * ldw, ldw, bias ? bias + n : nullptr, M, K);
}

// The MR x (2 kLanes) block of a rank-k update at rows r.. and columns j.. (rank_update_rows), in
// registers: eight independent sums for MR = 4.
template <typename T, int MR>
JACEXT_INLINE void rank_block(T* out, int64_t ldo, bool accumulate, const T* w, int64_t ldw, T c, const T* a,
                              int64_t lda, const T* y, int64_t ldy, int64_t k, int64_t j) {
  constexpr int V = kLanes<T>;
  Vec<T> acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < 2; ++h) {
      acc[r][h] = accumulate ? load(out + r * ldo + j + h * V)
                  : w        ? splat(c) * load(w + r * ldw + j + h * V)
                             : Vec<T>{};
    }
  }
  for (int64_t b = 0; b < k; ++b) {
    const Vec<T> y0 = load(y + b * ldy + j), y1 = load(y + b * ldy + j + V);
    for (int r = 0; r < MR; ++r) {
      const Vec<T> f = splat(a[b * lda + r]);
      acc[r][0] += f * y0;
      acc[r][1] += f * y1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(out + r * ldo + j, acc[r][0]);
    store(out + r * ldo + j + V, acc[r][1]);
  }
}

// out[r, :] = base + sum_{b < k} a[b * lda + r] y[b * ldy + :] for the rows [r0, r1): a rank-k update
// with k small (the flows' relative gradient delta^T (Y W) + c W at a small batch, a tile's weight
// gradient), base = out (accumulate), c w[r, :] (w given) or 0. Measured on a 784 x 784 output
// with k = 10, one thread: 0.27 ms, against 0.34 ms for MKL's product plus the c w pass and 1.1 ms
// for the plain loop this replaced.
template <typename T>
JACEXT_CPU_CLONES void rank_update_rows(T* out, int64_t ldo, bool accumulate, const T* w, int64_t ldw, T c,
                                        const T* a, int64_t lda, const T* y, int64_t ldy, int64_t k, int64_t N,
                                        int64_t r0, int64_t r1) {
  constexpr int C = 2 * kLanes<T>;
  const int64_t full = N / C * C;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    for (int64_t j = 0; j < full; j += C) {
      rank_block<T, 4>(out + r * ldo, ldo, accumulate, w ? w + r * ldw : nullptr, ldw, c, a + r, lda, y, ldy, k, j);
    }
  }
  for (; r < r1; ++r) {
    for (int64_t j = 0; j < full; j += C) {
      rank_block<T, 1>(out + r * ldo, ldo, accumulate, w ? w + r * ldw : nullptr, ldw, c, a + r, lda, y, ldy, k, j);
    }
  }
  for (int64_t row = r0; row < r1; ++row) {  // the last columns, fewer than C
    for (int64_t j = full; j < N; ++j) {
      T v = accumulate ? out[row * ldo + j] : w ? c * w[row * ldw + j] : T(0);
      for (int64_t b = 0; b < k; ++b) v += a[b * lda + row] * y[b * ldy + j];
      out[row * ldo + j] = v;
    }
  }
}

struct CpuKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return workspace_empty(sizes, options);
  }

  static int64_t sum_slots(int64_t B, int64_t tile) { return TileSchedule(B, tile).slots(); }  // common.h

  // out = a b and out = bias + a b, into any tensor (a view). MKL runs a product with few rows
  // (a small batch) on one thread; outside tiles, its columns are split over the threads instead
  // (measured: 10 x 784 x 784 in 0.66x the time, 100 x 1024 x 1024 in 0.88x).
  static void mm(Tensor out, const Tensor& a, const Tensor& b) { product(out, Tensor(), a, b); }
  static void addmm(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b) { product(out, bias, a, b); }

  static void product(Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    if (small_product(out, bias, a, b)) return;
    const int64_t n = b.size(1);
    if (a.size(0) > kFewRows || n < kSplitColumns || at::in_parallel_region() || at::get_num_threads() < 2) {
      bias.defined() ? at::addmm_out(out, bias, a, b) : at::mm_out(out, a, b);
      return;
    }
    parallel_for_as_caller(0, n, kSplitColumns / 4, [&](int64_t c0, int64_t c1) {
      Tensor part = out.narrow(1, c0, c1 - c0);
      if (bias.defined()) {
        at::addmm_out(part, bias.narrow(0, c0, c1 - c0), a, b.narrow(1, c0, c1 - c0));
      } else {
        at::mm_out(part, a, b.narrow(1, c0, c1 - c0));
      }
    });
  }

  // out = (bias +) a w^T by small_product_nt for a with at most kSmallRows rows and at least
  // kSmallDepth columns, b = w^T of a row-major w (the forward layers of a small batch), rows of a
  // and out contiguous; false otherwise. Columns split over the threads outside tiles.
  static bool small_product(Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    const auto dtype = out.scalar_type();
    if (M > kSmallRows || K < kSmallDepth || (dtype != at::kFloat && dtype != at::kDouble) ||
        a.scalar_type() != dtype || b.scalar_type() != dtype || b.stride(0) != 1 || b.stride(1) < K ||
        a.stride(1) != 1 || (out.stride(1) != 1 && N > 1) || (bias.defined() && (bias.dim() != 1 || bias.stride(0) != 1))) {
      return false;
    }
    if (M == 0 || N == 0) return true;
    AT_DISPATCH_FLOATING_TYPES(dtype, "jacext_small_product_cpu", [&] {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* wp = b.const_data_ptr<scalar_t>();
      const scalar_t* biasp = data_or_null<scalar_t>(bias);
      at::parallel_for(0, N, std::max<int64_t>(3, kGrain * 8 / (M * K)), [&](int64_t n0, int64_t n1) {
        small_product_nt(op, out.stride(0), ap, a.stride(0), wp, b.stride(1), biasp, M, K, n0, n1);
      });
    });
    return true;
  }

  // acc += a b (acc = a b when undefined, allocated from the workspace). A rank-k update with
  // a = x^T (k <= kSmallRank rows of x: a tile's weight gradient) runs on rank_update_rows.
  static void add_mm(Tensor& acc, const Tensor& a, const Tensor& b) {
    const bool first = !acc.defined();
    if (first) acc = empty({a.size(0), b.size(1)}, a.options());
    const int64_t k = a.size(1);
    if (k <= kSmallRank && a.stride(0) == 1 && b.stride(1) == 1 && acc.is_contiguous() &&
        (acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble)) {
      AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "jacext_add_mm_cpu", [&] {
        rank_rows<scalar_t>(acc, !first, nullptr, scalar_t(0), a.const_data_ptr<scalar_t>(), a.stride(1),
                  b.const_data_ptr<scalar_t>(), b.stride(0), k);
      });
    } else if (first) {
      mm(acc, a, b);
    } else {
      acc.addmm_(a, b);
    }
  }

  // rank_update_rows over every row of out, split over the threads (outside tiles).
  template <typename T>
  static void rank_rows(const Tensor& out, bool accumulate, const T* w, T c, const T* a, int64_t lda, const T* y,
                        int64_t ldy, int64_t k) {
    const int64_t R = out.size(0), N = out.size(1);
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, R, std::max<int64_t>(2, kGrain / std::max<int64_t>(k * N, 1)), [&](int64_t r0, int64_t r1) {
      rank_update_rows(op, N, accumulate, w, N, c, a, lda, y, ldy, k, N, r0, r1);
    });
  }

  template <class F>
  static void for_tiles(int64_t B, int64_t tile, F&& f) {  // common.h
    jacext::for_tiles(B, tile, std::forward<F>(f));
  }

  static bool side_by_side_pays(double f_macs, double g_macs) {  // common.h
    return jacext::side_by_side_pays(f_macs, g_macs);
  }
  template <class F, class G>
  static void side_by_side(bool beside, F&& f, G&& g) {  // common.h
    jacext::side_by_side(beside, std::forward<F>(f), std::forward<G>(g));
  }

  // In place: h holds y on entry and act(y) on exit; d = act'(y) and d2 = act''(y) where defined.
  static void activation_(const Tensor& h, const Tensor& d, const Tensor& d2, int64_t code, double p0,
                          double p1) {
    RECORD_FUNCTION("jacext::activation_cpu", {});  // named in profiles
    check_cpu_dtype(h);
    TORCH_INTERNAL_ASSERT(h.is_contiguous() && d.is_contiguous() && (!d2.defined() || d2.is_contiguous()));
    if (!device_formulas()) {  // ATen's vectorized transcendentals, unless the device's formulas are asked for
      if (code == kTanh && h.scalar_type() == at::kFloat) return tanh_float_(h, d, d2);
      if (code == kTanh || code == kSigmoid) return from_value(h, d, d2, code);
      if (code == kSiLU || code == kSoftplus || code == kSmoothLeakyReLU) return from_sigmoid(h, d, d2, code, p0, p1);
    }
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacext_activation_cpu", [&] {
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.defined() ? d2.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t a = static_cast<scalar_t>(p0), c = static_cast<scalar_t>(p1);
      dispatch_activation(code, [&](auto act) {
        at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
          activation_loop<decltype(act)::value, scalar_t>(hp, dp, d2p, a, c, begin, end);
        });
      });
    });
  }

  // tanh in float32: jacext's own loop (tanh_float_loop), value and derivatives in one pass.
  static void tanh_float_(const Tensor& h, const Tensor& d, const Tensor& d2) {
    float* hp = h.mutable_data_ptr<float>();
    float* dp = d.mutable_data_ptr<float>();
    float* d2p = mutable_or_null<float>(d2);
    at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) { tanh_float_loop(hp, dp, d2p, begin, end); });
  }

  // tanh and sigmoid: the value from ATen's vectorized kernel (scalar libm is about 10x slower),
  // then both derivatives from the value (derivatives_from_value).
  static void from_value(const Tensor& h, const Tensor& d, const Tensor& d2, int64_t code) {
    Tensor value = h;  // written in place
    if (code == kTanh) {
      at::tanh_out(value, h);
    } else {
      at::sigmoid_out(value, h);
    }
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacext_activation_from_value_cpu", [&] {
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
        derivatives_from_value(hp, dp, d2p, code == kTanh, begin, end);
      });
    });
  }

  // silu, softplus and smooth_leaky_relu: sigmoid(u) and log1p(exp(-|u|)) (u = y, or beta y for
  // softplus) from ATen's vectorized kernels into workspace temporaries, the rest by the formulas
  // of activations.h in one loop without transcendental calls (activation_from_sigmoid).
  static void from_sigmoid(const Tensor& h, const Tensor& d, const Tensor& d2, int64_t code, double p0,
                           double p1) {
    Tensor u = h;
    if (code == kSoftplus) u = empty(h.sizes(), h.options()).copy_(h).mul_(p0);
    Tensor sig = empty(h.sizes(), h.options());
    at::sigmoid_out(sig, u);
    Tensor tail = sig;  // softplus(u) - max(u, 0)
    if (code != kSiLU) {
      tail = empty(h.sizes(), h.options());
      at::abs_out(tail, u).neg_().exp_().log1p_();
    }
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacext_activation_from_sigmoid_cpu", [&] {
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* sp = sig.const_data_ptr<scalar_t>();
      const scalar_t* tp = tail.const_data_ptr<scalar_t>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();  // y on entry (u may be the same memory)
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.mutable_data_ptr<scalar_t>();
      const scalar_t a = static_cast<scalar_t>(p0), threshold = static_cast<scalar_t>(p1);
      at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
        activation_from_sigmoid(up, sp, tp, hp, dp, d2p, code, a, threshold, begin, end);
      });
    });
  }

  // out[b,r,j] = c * x[b',r,j] * cols[b,j] * rows[b,r] * sample[b] for out (n, R, N), where
  // b' = b, or 0 when x has one sample (a weight broadcast over the batch); an undefined factor
  // is 1. The one scaling pass: D_k before a GEMM, the first carries, the loss's factor 2 g_b.
  static void scale(const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in,
                    const Tensor& sample_in, double c, const Tensor& out) {
    const Tensor cols = optional_contiguous(cols_in), rows = optional_contiguous(rows_in);
    const Tensor sample = optional_contiguous(sample_in);
    RECORD_FUNCTION("jacext::scale_cpu", {});
    check_cpu_dtype(out);
    Tensor x = x_in.contiguous();
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    const int64_t x_stride = x.size(0) == 1 ? 0 : R * N;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_scale_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* cp = data_or_null<scalar_t>(cols);
      const scalar_t* rp = data_or_null<scalar_t>(rows);
      const scalar_t* sp = data_or_null<scalar_t>(sample);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        scale_samples(xp, x_stride, cp, rp, sp, static_cast<scalar_t>(c), op, R, N, begin, end);
      });
    });
  }

  // out[b] = sum_{r,j} (x[b',r,j] * cols[b,j])^2 for out (n), or per row out[b,r] for out (n, R);
  // x may be broadcast (one sample), cols undefined (ones).
  static void square_sum(const Tensor& x, const Tensor& cols, const Tensor& out) {
    RECORD_FUNCTION("jacext::square_sum_cpu", {});
    reduce_product(x, x, cols, out);
  }

  // out[b] = sum_{r,j} a[b,r,j] * c[b',r,j] for out (n), or per row for out (n, R); c may be
  // broadcast (one sample).
  static void pair_sum(const Tensor& a, const Tensor& c, const Tensor& out) {
    RECORD_FUNCTION("jacext::pair_sum_cpu", {});
    reduce_product(a, c, Tensor(), out);
  }

  // sum over j (and r for a 1-d out) of a * c * cols^2, in double.
  static void reduce_product(const Tensor& a_in, const Tensor& c_in, const Tensor& cols_in, const Tensor& out) {
    const Tensor cols = optional_contiguous(cols_in);
    check_cpu_dtype(out);
    Tensor a = a_in.contiguous(), c = c_in.contiguous();
    const int64_t n = out.size(0), R = a.size(1), N = a.size(2);
    const int64_t a_stride = a.size(0) == 1 ? 0 : R * N, c_stride = c.size(0) == 1 ? 0 : R * N;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_reduce_product_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* cp = c.const_data_ptr<scalar_t>();
      const scalar_t* wp = data_or_null<scalar_t>(cols);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        reduce_product_samples<scalar_t, acc_t>(ap, a_stride, cp, c_stride, wp, op, out.dim() == 2, R, N, begin, end);
      });
    });
  }

  // The backward's step through a diagonal: a = c * x * cols * sample (undefined factors are 1; x
  // (n, R, N), cols (n, N), sample (n)), adj_d[b,j] = sum_r r[b',r,j] * a[b,r,j] (where adj_d is
  // defined; r may be broadcast), out = a * d (columns, where d is defined). out may be x (in place);
  // a fresh out takes an adjoint that was to be scaled first (the loss's 2 g) in the same pass.
  static void rowwise_dot_scale(const Tensor& r_in, const Tensor& x_in, const Tensor& cols_in, const Tensor& sample_in,
                                double c, const Tensor& d_in, const Tensor& adj_d, const Tensor& out) {
    const Tensor d = optional_contiguous(d_in), cols = optional_contiguous(cols_in);
    const Tensor sample = optional_contiguous(sample_in);
    RECORD_FUNCTION("jacext::rowwise_dot_scale_cpu", {});
    check_cpu_dtype(out);
    TORCH_INTERNAL_ASSERT(out.is_contiguous());
    const Tensor x = x_in.contiguous();
    const bool unchanged = x.is_same(out) && !cols.defined() && !sample.defined() && c == 1.0 && !d.defined();
    if (!adj_d.defined() && unchanged) return;
    Tensor r = r_in.contiguous();
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    const int64_t r_stride = r.size(0) == 1 ? 0 : R * N;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_rowwise_dot_scale_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* cp = data_or_null<scalar_t>(cols);
      const scalar_t* sp = data_or_null<scalar_t>(sample);
      const scalar_t* dp = data_or_null<scalar_t>(d);
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      scalar_t* op = adj_d.defined() ? adj_d.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(op ? N : 0);
        rowwise_dot_scale_samples(rp, r_stride, xp, cp, sp, static_cast<scalar_t>(c), dp, outp, op, acc.data(), R, N,
                                  begin, end);
      });
    });
  }

  // acc[r,j] += sum_b x[b,r,j] * cols[b,j] * rows[b,r] (undefined factors are 1): a weight
  // gradient of a carry formed from a broadcast weight.
  static void batch_sum_(const Tensor& acc, const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in) {
    const Tensor cols = optional_contiguous(cols_in), rows = optional_contiguous(rows_in);
    RECORD_FUNCTION("jacext::batch_sum_cpu", {});
    check_cpu_dtype(acc);
    Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), R = x.size(1), N = x.size(2);
    AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "jacext_batch_sum_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* cp = data_or_null<scalar_t>(cols);
      const scalar_t* rp = data_or_null<scalar_t>(rows);
      scalar_t* ap = acc.mutable_data_ptr<scalar_t>();
      // rows of acc split over the threads: each thread owns its rows
      at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(n * N, 1)), [&](int64_t begin, int64_t end) {
        std::vector<at::acc_type<scalar_t, false>> sums(N);
        batch_sum_rows(ap, xp, cp, rp, sums.data(), n, R, N, begin, end);
      });
    });
  }

  // out = a^T y + c w for a (k, R), y (k, N) and w (R, N) (w undefined: no such term; c a 0-d
  // tensor): the flow's relative gradient delta^T (Y W) with log|det W|'s term. For a small batch k
  // one pass over out (rank_update_rows; the c w term would be a second pass); a larger batch goes
  // to the GEMM.
  static void rank_update(Tensor out, const Tensor& a_in, const Tensor& y_in, const Tensor& w_in, const Tensor& c) {
    RECORD_FUNCTION("jacext::rank_update_cpu", {});
    check_cpu_dtype(out);
    const int64_t k = a_in.size(0);
    if (k > kSmallRank) {  // c w as the GEMM's beta term: no second pass over out
      if (w_in.defined()) {
        at::addmm_out(out, w_in, a_in.t(), y_in, c.item<double>(), 1.0);
      } else {
        mm(out, a_in.t(), y_in);
      }
      return;
    }
    Tensor a = a_in.contiguous(), y = y_in.contiguous(), w = optional_contiguous(w_in);
    TORCH_INTERNAL_ASSERT(out.is_contiguous());
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_rank_update_cpu", [&] {
      rank_rows(out, false, data_or_null<scalar_t>(w), w.defined() ? c.item<scalar_t>() : scalar_t(0),
                a.const_data_ptr<scalar_t>(), out.size(0), y.const_data_ptr<scalar_t>(), y.size(1), k);
    });
  }

  // g = grad_h * d + adj_d * d2 (absent terms left out; an absent d is 1) and grad_b += sum_b g:
  // the MLP backward's d/dy with its bias gradient.
  static void mlp_delta(const Tensor& grad_h_in, const Tensor& d_in, const Tensor& adj_d_in, const Tensor& d2_in,
                        const Tensor& g, const Tensor& grad_b) {
    const Tensor d = optional_contiguous(d_in), adj_d = optional_contiguous(adj_d_in);
    const Tensor d2 = optional_contiguous(d2_in);
    RECORD_FUNCTION("jacext::mlp_delta_cpu", {});
    check_cpu_dtype(g);
    Tensor grad_h = optional_contiguous(grad_h_in);
    const int64_t n = g.size(0), N = g.size(1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "jacext_mlp_delta_cpu", [&] {
      const scalar_t* hp = data_or_null<scalar_t>(grad_h);
      const scalar_t* dp = data_or_null<scalar_t>(d);
      const scalar_t* ap = data_or_null<scalar_t>(adj_d);
      const scalar_t* d2p = data_or_null<scalar_t>(d2);
      scalar_t* gp = g.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, sample_grain(N), [&](int64_t begin, int64_t end) {
        mlp_delta_samples(hp, dp, ap, d2p, gp, N, begin, end);
      });
      if (grad_b.defined()) {  // columns split over the threads
        scalar_t* bp = grad_b.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
          std::vector<at::acc_type<scalar_t, false>> sums(end - begin);
          column_sums(bp, gp, sums.data(), n, N, begin, end);
        });
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(jacext, CPU, m) {
  m.impl("mlp_jacobian_frobenius", &mlp_jacobian_frobenius<CpuKernels>);
  m.impl("mlp_jacobian", &mlp_jacobian<CpuKernels>);
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward<CpuKernels>);
  m.impl("mlp_flow", &mlp_flow<CpuKernels>);
  m.impl("mlp_flow_backward", &mlp_flow_backward<CpuKernels>);
}

}  // namespace jacext
