// CPU kernels of the MLP-Jacobian ops: the elementwise passes and reductions, with
// at::parallel_for; the GEMMs and the algorithms themselves live in ../mlp_jacobian.h
// and ../mlp_flow.h.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <ATen/Parallel.h>
#include <ATen/AccumulateType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../mlp_flow.h"
#include "../mlp_jacobian.h"

namespace jacext {
namespace {

constexpr int64_t kGrain = 2048;

void check_cpu_dtype(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CPU kernels support float32 and float64, got ", t.scalar_type());
}

struct CpuKernels {
  // h = act(y), d = act'(y), d2 = act''(y) in one pass.
  static std::tuple<Tensor, Tensor, Tensor> activation_forward(const Tensor& y_in, int64_t code,
                                                               double p0, double p1) {
    RECORD_FUNCTION("jacext::activation_forward_cpu", {});  // named in profiles
    check_cpu_dtype(y_in);
    Tensor y = y_in.contiguous();
    if (code == kTanh || code == kSigmoid) return from_value(y, code);
    if (code == kSiLU || code == kSoftplus || code == kSmoothLeakyReLU) return from_sigmoid(y, code, p0, p1);
    Tensor h = at::empty_like(y), d = at::empty_like(y), d2 = at::empty_like(y);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "jacext_activation_forward_cpu", [&] {
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.mutable_data_ptr<scalar_t>();
      const scalar_t a = static_cast<scalar_t>(p0), c = static_cast<scalar_t>(p1);
      dispatch_activation(code, [&](auto act) {
        at::parallel_for(0, y.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            ActDerivs<scalar_t> r = activation_derivs<decltype(act)::value, scalar_t>(yp[i], a, c);
            hp[i] = r.value;
            dp[i] = r.d1;
            d2p[i] = r.d2;
          }
        });
      });
    });
    return {h, d, d2};
  }

  // tanh and sigmoid: the value from ATen's vectorized kernel (scalar libm is about 10x
  // slower), then both derivatives from the value, as in activations.h, in one loop the
  // compiler vectorizes: tanh' = 1 - t^2, tanh'' = -2 t tanh'; s' = s (1 - s), s'' = s' (1 - 2 s).
  static std::tuple<Tensor, Tensor, Tensor> from_value(const Tensor& y, int64_t code) {
    Tensor h = code == kTanh ? at::tanh(y) : at::sigmoid(y);
    Tensor d = at::empty_like(y), d2 = at::empty_like(y);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "jacext_activation_from_value_cpu", [&] {
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.mutable_data_ptr<scalar_t>();
      const bool is_tanh = code == kTanh;
      at::parallel_for(0, y.numel(), kGrain, [&](int64_t begin, int64_t end) {
        if (is_tanh) {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t t = hp[i], s = scalar_t(1) - t * t;
            dp[i] = s;
            d2p[i] = scalar_t(-2) * t * s;
          }
        } else {
          for (int64_t i = begin; i < end; ++i) {
            const scalar_t v = hp[i], ds = v * (scalar_t(1) - v);
            dp[i] = ds;
            d2p[i] = ds * (scalar_t(1) - scalar_t(2) * v);
          }
        }
      });
    });
    return {h, d, d2};
  }

  // silu, softplus and smooth_leaky_relu: sigmoid(u) and log1p(exp(-|u|)) (u = y, or beta y for
  // softplus) from ATen's vectorized kernels, the rest by the formulas of activations.h in one
  // loop without transcendental calls.
  static std::tuple<Tensor, Tensor, Tensor> from_sigmoid(const Tensor& y, int64_t code, double p0, double p1) {
    Tensor u = code == kSoftplus ? y * p0 : y;
    Tensor sig = at::sigmoid(u);
    Tensor tail = code == kSiLU ? sig : at::abs(u).neg_().exp_().log1p_();  // softplus(u) - max(u, 0)
    Tensor h = at::empty_like(y), d = at::empty_like(y), d2 = at::empty_like(y);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "jacext_activation_from_sigmoid_cpu", [&] {
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* sp = sig.const_data_ptr<scalar_t>();
      const scalar_t* tp = tail.const_data_ptr<scalar_t>();
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.mutable_data_ptr<scalar_t>();
      const scalar_t a = static_cast<scalar_t>(p0), threshold = static_cast<scalar_t>(p1);
      at::parallel_for(0, y.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t v = yp[i], s = sp[i], ds = s * (scalar_t(1) - s);
          const scalar_t softplus = (up[i] > scalar_t(0) ? up[i] : scalar_t(0)) + tp[i];
          if (code == kSiLU) {
            hp[i] = v * s;
            dp[i] = s + v * ds;
            d2p[i] = ds * (scalar_t(2) + v * (scalar_t(1) - scalar_t(2) * s));
          } else if (code == kSoftplus) {  // linear above beta y > threshold, as torch
            const bool linear = up[i] > threshold;
            hp[i] = linear ? v : softplus / a;
            dp[i] = linear ? scalar_t(1) : s;
            d2p[i] = linear ? scalar_t(0) : a * ds;
          } else {  // smooth_leaky_relu: a y + (1 - a) softplus(y)
            hp[i] = a * v + (scalar_t(1) - a) * softplus;
            dp[i] = a + (scalar_t(1) - a) * s;
            d2p[i] = (scalar_t(1) - a) * ds;
          }
        }
      });
    });
    return {h, d, d2};
  }

  // sq[b] = sum_{r,j} (x[b,r,j] * d[b,j])^2 for x (B, R, N); d (B, N) may be undefined (ones).
  static Tensor scaled_square_sum(const Tensor& x_in, const Tensor& d_in) {
    RECORD_FUNCTION("jacext::scaled_square_sum_cpu", {});  // named in profiles
    check_cpu_dtype(x_in);
    Tensor x = x_in.contiguous();
    Tensor d = d_in.defined() ? d_in.contiguous() : d_in;
    const int64_t B = x.size(0), R = x.size(1), N = x.size(2);
    Tensor sq = at::empty({B}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jacext_scaled_square_sum_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* dp = d.defined() ? d.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* sp = sq.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* xb = xp + b * R * N;
          acc_t total = 0;
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t j = 0; j < N; ++j) {
              acc_t v = static_cast<acc_t>(xb[r * N + j]) * (dp ? dp[b * N + j] : scalar_t(1));
              total += v * v;
            }
          }
          sp[b] = static_cast<scalar_t>(total);
        }
      });
    });
    return sq;
  }

  // out[b,j] = sum_r x[b,r,j] * y[b,r,j] for x (B, R, N) and y (B, R, N) or (1, R, N) (the same
  // for every sample).
  static Tensor rowwise_dot(const Tensor& x_in, const Tensor& y_in) {
    RECORD_FUNCTION("jacext::rowwise_dot_cpu", {});  // named in profiles
    check_cpu_dtype(x_in);
    Tensor x = x_in.contiguous(), y = y_in.contiguous();
    const int64_t B = x.size(0), R = x.size(1), N = x.size(2);
    const int64_t y_batch_stride = y.size(0) == 1 ? 0 : R * N;
    Tensor out = at::empty({B, N}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jacext_rowwise_dot_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(N);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          const scalar_t* xb = xp + b * R * N;
          const scalar_t* yb = yp + b * y_batch_stride;
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t j = 0; j < N; ++j) {
              acc[j] += static_cast<acc_t>(xb[r * N + j]) * yb[r * N + j];
            }
          }
          for (int64_t j = 0; j < N; ++j) op[b * N + j] = static_cast<scalar_t>(acc[j]);
        }
      });
    });
    return out;
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
