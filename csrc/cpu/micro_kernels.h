// The CPU kernels' inner loops (the "micro-kernels"): plain functions over raw pointers and a
// range, which at::parallel_for's chunks call; no ATen types, no threads. CpuKernels
// (mlp_jacobian_kernels.h) picks them and splits the work. Internal linkage: each translation unit
// that includes this header gets its own clones (target_clones below).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../activations.h"

namespace jacext {
namespace {

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

// tanh in float32 by jacext's own loop: it computes the value and both derivatives in one pass,
// where ATen's float tanh (MKL's vector math) gives the value alone, at a higher cost. It stays
// within 1.33 ulp of the correctly rounded tanh over every float in [-12, 12] (ATen's: 0.51), by
// Cephes' tanhf: x + x^3 P(x^2) below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1)
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
// 3 rows of w. MKL runs products this thin below its rate.
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
// gradient), base = out (accumulate), c w[r, :] (w given) or 0, in one pass over out (MKL's
// product would need a second pass for the c w term, and runs a rank this small below its rate).
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

}  // namespace
}  // namespace jacext
