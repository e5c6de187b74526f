// The activation table: sigma, sigma' and sigma'' for every supported activation, as inline
// host/device functions. The CPU kernels and the CUDA kernels both evaluate these very formulas,
// so the CPU tests exercise what the GPU runs. The codes must match jacext/activations.py.
#pragma once
#include <cmath>

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
    return T(1) / (T(1) + exp(-y));
  }
  T e = exp(y);
  return e / (T(1) + e);
}

// log(1 + e^y) without overflow.
template <typename T>
JACEXT_HD T stable_softplus(T y) {
  return (y > T(0) ? y : T(0)) + log1p(exp(-fabs(y)));
}

template <typename T>
JACEXT_HD ActDerivs<T> activation_derivs(int64_t code, T y, T p0, T p1) {
  switch (code) {
    case kReLU:
      return {y > T(0) ? y : T(0), y > T(0) ? T(1) : T(0), T(0)};
    case kLeakyReLU:
      return {y > T(0) ? y : p0 * y, y > T(0) ? T(1) : p0, T(0)};
    case kTanh: {
      T t = tanh(y), s = T(1) - t * t;
      return {t, s, T(-2) * t * s};
    }
    case kSigmoid: {
      T s = stable_sigmoid(y), ds = s * (T(1) - s);
      return {s, ds, ds * (T(1) - T(2) * s)};
    }
    case kSoftplus: {
      T by = p0 * y;
      if (by > p1) return {y, T(1), T(0)};
      T s = stable_sigmoid(by);
      return {stable_softplus(by) / p0, s, p0 * s * (T(1) - s)};
    }
    case kELU: {
      if (y > T(0)) return {y, T(1), T(0)};
      T e = p0 * exp(y);
      return {e - p0, e, e};
    }
    case kGELU: {
      const T inv_sqrt2 = T(0.70710678118654752440), inv_sqrt_2pi = T(0.39894228040143267794);
      T cdf = T(0.5) * (T(1) + erf(y * inv_sqrt2));
      T pdf = inv_sqrt_2pi * exp(T(-0.5) * y * y);
      return {y * cdf, cdf + y * pdf, pdf * (T(2) - y * y)};
    }
    case kGELUTanh: {
      const T k = T(0.79788456080286535588), c = T(0.044715);  // k = sqrt(2/pi)
      T u = k * (y + c * y * y * y), du = k * (T(1) + T(3) * c * y * y), ddu = k * T(6) * c * y;
      T t = tanh(u), s = T(1) - t * t;
      return {T(0.5) * y * (T(1) + t), T(0.5) * (T(1) + t) + T(0.5) * y * s * du,
              s * (du + T(0.5) * y * (ddu - T(2) * t * du * du))};
    }
    case kSiLU: {
      T s = stable_sigmoid(y), ds = s * (T(1) - s);
      return {y * s, s + y * ds, ds * (T(2) + y * (T(1) - T(2) * s))};
    }
    case kSmoothLeakyReLU: {
      T s = stable_sigmoid(y);
      return {p0 * y + (T(1) - p0) * stable_softplus(y), p0 + (T(1) - p0) * s,
              (T(1) - p0) * s * (T(1) - s)};
    }
    default:  // kIdentity (codes are validated before any kernel runs)
      return {y, T(1), T(0)};
  }
}

}  // namespace jacext
