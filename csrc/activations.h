// The activation table: sigma, sigma' and sigma'' for every supported activation, as inline
// host/device functions (float math in float: std:: overloads, not the C double functions). The
// CPU kernels and the CUDA kernels both evaluate these very formulas, so the CPU tests exercise
// what the GPU runs; one exception: on CPU, the transcendental parts of tanh, sigmoid, silu,
// softplus and smooth_leaky_relu come from vectorized loops (float32 tanh: jacext's own,
// cpu/micro_kernels.h's tanh_float; otherwise ATen's tanh(y), sigmoid(y), log1p(exp(-|y|))),
// the rest by the formulas here. The codes must match jacext/activations.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define JACEXT_HD __host__ __device__ __forceinline__
#else
#define JACEXT_HD inline
#endif

namespace jacext {

enum Activation : int64_t {
  kIdentity = 0,
  kReLU = 1,
  kLeakyReLU = 2,        // p0 = negative slope
  kTanh = 3,
  kSigmoid = 4,
  kSoftplus = 5,         // p0 = beta, p1 = threshold (linear above beta*y > threshold, as torch)
  kELU = 6,              // p0 = alpha
  kGELU = 7,             // exact (erf) form
  kGELUTanh = 8,         // tanh approximation
  kSiLU = 9,
  kSmoothLeakyReLU = 10, // p0 = alpha: alpha*y + (1-alpha)*log(1+e^y)
  kNumActivations = 11,
};

// Value and first two derivatives of one activation at one point.
template <typename T>
struct ActDerivs {
  T value, d1, d2;
};

template <typename T>
JACEXT_HD T stable_sigmoid(T y) {
  if (y >= T(0)) {
    return T(1) / (T(1) + std::exp(-y));
  }
  T e = std::exp(y);
  return e / (T(1) + e);
}

// sigmoid(y) and softplus(y) = log(1 + e^y), without overflow, from one exponential.
template <typename T>
struct SigmoidSoftplus {
  T sigmoid, softplus;
};

template <typename T>
JACEXT_HD SigmoidSoftplus<T> sigmoid_softplus(T y) {
  T e = std::exp(-std::fabs(y));
  return {(y >= T(0) ? T(1) : e) / (T(1) + e), (y > T(0) ? y : T(0)) + std::log1p(e)};
}

// The activation is a template parameter so that each kernel loop is compiled for one
// activation (no per-element switch: the loop vectorizes where the formula allows).
template <int64_t Code, typename T>
JACEXT_HD ActDerivs<T> activation_derivs(T y, T p0, T p1) {
  if constexpr (Code == kReLU) {
    return {y > T(0) ? y : T(0), y > T(0) ? T(1) : T(0), T(0)};
  } else if constexpr (Code == kLeakyReLU) {
    return {y > T(0) ? y : p0 * y, y > T(0) ? T(1) : p0, T(0)};
  } else if constexpr (Code == kTanh) {
    T t = std::tanh(y), s = T(1) - t * t;
    return {t, s, T(-2) * t * s};
  } else if constexpr (Code == kSigmoid) {
    T s = stable_sigmoid(y), ds = s * (T(1) - s);
    return {s, ds, ds * (T(1) - T(2) * s)};
  } else if constexpr (Code == kSoftplus) {
    T by = p0 * y;
    if (by > p1) return {y, T(1), T(0)};
    auto [s, sp] = sigmoid_softplus(by);
    return {sp / p0, s, p0 * s * (T(1) - s)};
  } else if constexpr (Code == kELU) {
    if (y > T(0)) return {y, T(1), T(0)};
    T e = p0 * std::exp(y);
    return {e - p0, e, e};
  } else if constexpr (Code == kGELU) {
    const T inv_sqrt2 = T(0.70710678118654752440), inv_sqrt_2pi = T(0.39894228040143267794);
    T cdf = T(0.5) * (T(1) + std::erf(y * inv_sqrt2));
    T pdf = inv_sqrt_2pi * std::exp(T(-0.5) * y * y);
    return {y * cdf, cdf + y * pdf, pdf * (T(2) - y * y)};
  } else if constexpr (Code == kGELUTanh) {
    const T k = T(0.79788456080286535588), c = T(0.044715);  // k = sqrt(2/pi)
    T u = k * (y + c * y * y * y), du = k * (T(1) + T(3) * c * y * y), ddu = k * T(6) * c * y;
    T t = std::tanh(u), s = T(1) - t * t;
    return {T(0.5) * y * (T(1) + t), T(0.5) * (T(1) + t) + T(0.5) * y * s * du,
            s * (du + T(0.5) * y * (ddu - T(2) * t * du * du))};
  } else if constexpr (Code == kSiLU) {
    T s = stable_sigmoid(y), ds = s * (T(1) - s);
    return {y * s, s + y * ds, ds * (T(2) + y * (T(1) - T(2) * s))};
  } else if constexpr (Code == kSmoothLeakyReLU) {
    auto [s, sp] = sigmoid_softplus(y);
    return {p0 * y + (T(1) - p0) * sp, p0 + (T(1) - p0) * s, (T(1) - p0) * s * (T(1) - s)};
  } else {  // kIdentity
    return {y, T(1), T(0)};
  }
}

// Value and first three derivatives: sigma''' is what the Laplacian's backward needs
// (mlp_laplacian.h). Kept beside activation_derivs (which the first-order kernels use) rather
// than folded into it, so that those kernels compute nothing they do not read; the value and the
// first two derivatives are those of activation_derivs.
template <typename T>
struct ActDerivs3 {
  T value, d1, d2, d3;
};

// tanh and sigmoid from their value v (the CPU kernels take v from ATen's vectorized kernels):
// tanh' = 1 - v^2, tanh'' = -2 v tanh', tanh''' = -2 tanh' (1 - 3 v^2); sigmoid' = v (1 - v),
// sigmoid'' = sigmoid' (1 - 2 v), sigmoid''' = sigmoid' (1 - 6 v + 6 v^2).
template <int64_t Code, typename T>
JACEXT_HD ActDerivs3<T> derivs3_from_value(T v) {
  static_assert(Code == kTanh || Code == kSigmoid, "only tanh and sigmoid follow from their value");
  if constexpr (Code == kTanh) {
    T s = T(1) - v * v;
    return {v, s, T(-2) * v * s, T(-2) * s * (T(1) - T(3) * v * v)};
  } else {
    T ds = v * (T(1) - v);
    return {v, ds, ds * (T(1) - T(2) * v), ds * (T(1) - T(6) * v + T(6) * v * v)};
  }
}

template <int64_t Code, typename T>
JACEXT_HD ActDerivs3<T> activation_derivs3(T y, T p0, T p1) {
  const ActDerivs<T> r = activation_derivs<Code, T>(y, p0, p1);
  if constexpr (Code == kTanh || Code == kSigmoid) {
    return derivs3_from_value<Code, T>(r.value);
  } else if constexpr (Code == kSoftplus) {  // beta^2 s' (1 - 2 s) at s = sigmoid(beta y); 0 where linear
    if (p0 * y > p1) return {r.value, r.d1, r.d2, T(0)};
    return {r.value, r.d1, r.d2, p0 * r.d2 * (T(1) - T(2) * r.d1)};
  } else if constexpr (Code == kELU) {  // alpha e^y for y <= 0, like d1 and d2
    return {r.value, r.d1, r.d2, r.d2};
  } else if constexpr (Code == kGELU) {  // phi(y) (y^3 - 4 y)
    const T inv_sqrt_2pi = T(0.39894228040143267794);
    return {r.value, r.d1, r.d2, inv_sqrt_2pi * std::exp(T(-0.5) * y * y) * y * (y * y - T(4))};
  } else if constexpr (Code == kGELUTanh) {
    // f = y (1 + t(u)) / 2: f''' = 3/2 t'' + y/2 t''' with t'' = s (u'' - 2 t u'^2) and
    // t''' = s (u''' - 6 t u' u'' + (6 t^2 - 2) u'^3), s = 1 - t^2.
    const T k = T(0.79788456080286535588), c = T(0.044715);
    T u = k * (y + c * y * y * y), du = k * (T(1) + T(3) * c * y * y), ddu = k * T(6) * c * y, dddu = k * T(6) * c;
    T t = std::tanh(u), s = T(1) - t * t;
    T t2 = s * (ddu - T(2) * t * du * du);
    T t3 = s * (dddu - T(6) * t * du * ddu + (T(6) * t * t - T(2)) * du * du * du);
    return {r.value, r.d1, r.d2, T(1.5) * t2 + T(0.5) * y * t3};
  } else if constexpr (Code == kSiLU) {  // 3 s'' + y s''' with s = sigmoid(y)
    T s = stable_sigmoid(y), ds = s * (T(1) - s);
    return {r.value, r.d1, r.d2, ds * (T(3) * (T(1) - T(2) * s) + y * (T(1) - T(6) * s + T(6) * s * s))};
  } else if constexpr (Code == kSmoothLeakyReLU) {  // (1 - alpha) s' (1 - 2 s)
    T s = stable_sigmoid(y);
    return {r.value, r.d1, r.d2, r.d2 * (T(1) - T(2) * s)};
  } else {  // identity, relu, leaky_relu: piecewise linear
    return {r.value, r.d1, r.d2, T(0)};
  }
}

// Calls f(std::integral_constant<int64_t, Code>{}) for a runtime activation code (validated
// before any kernel runs; an unknown code falls back to identity).
template <typename F>
void dispatch_activation(int64_t code, F&& f) {
  switch (code) {
    case kReLU: return f(std::integral_constant<int64_t, kReLU>{});
    case kLeakyReLU: return f(std::integral_constant<int64_t, kLeakyReLU>{});
    case kTanh: return f(std::integral_constant<int64_t, kTanh>{});
    case kSigmoid: return f(std::integral_constant<int64_t, kSigmoid>{});
    case kSoftplus: return f(std::integral_constant<int64_t, kSoftplus>{});
    case kELU: return f(std::integral_constant<int64_t, kELU>{});
    case kGELU: return f(std::integral_constant<int64_t, kGELU>{});
    case kGELUTanh: return f(std::integral_constant<int64_t, kGELUTanh>{});
    case kSiLU: return f(std::integral_constant<int64_t, kSiLU>{});
    case kSmoothLeakyReLU: return f(std::integral_constant<int64_t, kSmoothLeakyReLU>{});
    default: return f(std::integral_constant<int64_t, kIdentity>{});
  }
}

}  // namespace jacext
