// CudaKernels, the CUDA kernels of the MLP-Jacobian and flow ops: the fused elementwise passes and
// reductions, on the current stream; the GEMMs (cuBLAS through ATen) and the algorithms themselves live in
// ../mlp_jacobian.h and ../mlp_flow.h. The GPU runs the whole batch as one tile (each GEMM over
// every sample); tensors come from torch's caching allocator. Sums accumulate in double, as on
// the CPU, so the two devices agree.
//
// Included by mlp_jacobian_cuda.cu and mlp_flow_cuda.cu, which register the two op families.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include "../mlp_common.h"
#include "common.cuh"

namespace jacext {
namespace {


template <int64_t Code, typename scalar_t>
__global__ void activation_kernel(scalar_t* __restrict__ h, scalar_t* __restrict__ d,
                                  scalar_t* __restrict__ d2, int64_t n, scalar_t p0, scalar_t p1) {
  JACEXT_GRID_STRIDE(i, n) {
    ActDerivs<scalar_t> r = activation_derivs<Code, scalar_t>(h[i], p0, p1);
    h[i] = r.value;
    d[i] = r.d1;
    if (d2) d2[i] = r.d2;
  }
}

// out[b,r,j] = c * x[b',r,j] * cols[b,j] * rows[b,r] * sample[b] (b' = 0 when x_stride is 0).
template <typename scalar_t>
__global__ void scale_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cols,
                             const scalar_t* __restrict__ rows, const scalar_t* __restrict__ sample,
                             scalar_t c, scalar_t* __restrict__ out, int64_t n, int64_t R, int64_t N,
                             int64_t x_stride) {
  JACEXT_GRID_STRIDE(i, n * R * N) {
    const int64_t b = i / (R * N), r = (i / N) % R, j = i % N;
    scalar_t v = x[b * x_stride + r * N + j] * c;
    if (cols) v *= cols[b * N + j];
    if (rows) v *= rows[b * R + r];
    if (sample) v *= sample[b];
    out[i] = v;
  }
}

// One block per output element (a sample, or a sample's row): sum over j (and r) of
// a[b,r,j] * c[b',r,j] * cols[b,j]^2, in double.
template <typename scalar_t>
__global__ void reduce_product_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c,
                                      const scalar_t* __restrict__ cols, scalar_t* __restrict__ out,
                                      int64_t R, int64_t N, int64_t a_stride, int64_t c_stride,
                                      bool per_row) {
  const int64_t o = blockIdx.x;
  const int64_t b = per_row ? o / R : o;
  const int64_t r0 = per_row ? o % R : 0, r1 = per_row ? r0 + 1 : R;
  double total = 0;
  for (int64_t k = r0 * N + threadIdx.x; k < r1 * N; k += blockDim.x) {
    const int64_t j = k % N;
    double v = static_cast<double>(a[b * a_stride + k]) * c[b * c_stride + k];
    if (cols) v *= static_cast<double>(cols[b * N + j]) * cols[b * N + j];
    total += v;
  }
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = total;
  __syncthreads();
  for (unsigned stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[o] = static_cast<scalar_t>(partial[0]);
}

// One thread per (b, j): a[b,:,j] = c * x[b,:,j] * cols[b,j] * sample[b], adj_d[b,j] =
// sum_r r[b',r,j] a[b,r,j], out[b,:,j] = a * d[b,j] (consecutive j: coalesced reads). out may be x.
template <typename scalar_t>
__global__ void rowwise_dot_scale_kernel(const scalar_t* __restrict__ r, const scalar_t* x,
                                         const scalar_t* __restrict__ cols, const scalar_t* __restrict__ sample,
                                         scalar_t c, const scalar_t* __restrict__ d, scalar_t* out,
                                         scalar_t* __restrict__ adj_d, int64_t n, int64_t R, int64_t N,
                                         int64_t r_stride) {
  JACEXT_GRID_STRIDE(i, n * N) {
    const int64_t b = i / N, j = i % N;
    const scalar_t* rb = r + b * r_stride + j;
    const scalar_t f = c * (sample ? sample[b] : scalar_t(1));
    const scalar_t dj = d ? d[i] : scalar_t(1);
    double acc = 0;
    for (int64_t row = 0; row < R; ++row) {
      const int64_t k = (b * R + row) * N + j;
      const scalar_t a = cols ? x[k] * cols[i] * f : x[k] * f;  // the CPU's order of the factors
      acc += static_cast<double>(rb[row * N]) * a;
      out[k] = a * dj;
    }
    if (adj_d) adj_d[i] = static_cast<scalar_t>(acc);
  }
}

// One thread per (r, j): acc[r,j] += sum_b x[b,r,j] * cols[b,j] * rows[b,r].
template <typename scalar_t>
__global__ void batch_sum_kernel(scalar_t* __restrict__ acc, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ cols, const scalar_t* __restrict__ rows,
                                 int64_t n, int64_t R, int64_t N) {
  JACEXT_GRID_STRIDE(i, R * N) {
    const int64_t r = i / N, j = i % N;
    double total = 0;
    for (int64_t b = 0; b < n; ++b) {
      double v = x[(b * R + r) * N + j];
      if (cols) v *= cols[b * N + j];
      if (rows) v *= rows[b * R + r];
      total += v;
    }
    acc[i] += static_cast<scalar_t>(total);
  }
}

// g = grad_h * d + adj_d * d2 (absent terms left out, an absent d is 1).
template <typename scalar_t>
__global__ void mlp_delta_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ d,
                                 const scalar_t* __restrict__ adj_d, const scalar_t* __restrict__ d2,
                                 scalar_t* __restrict__ g, int64_t total) {
  JACEXT_GRID_STRIDE(i, total) {
    scalar_t v = grad_h ? (d ? grad_h[i] * d[i] : grad_h[i]) : scalar_t(0);
    if (adj_d && d2) v += adj_d[i] * d2[i];
    g[i] = v;
  }
}

struct CudaKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static int64_t sum_slots(int64_t /*B*/, int64_t /*tile*/) { return 1; }  // one tile: one sum

  // out = a b and out = bias + a b (cuBLAS through ATen), into any tensor (a view).
  static void mm(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
  static void addmm(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    at::addmm_out(out, bias, a, b);
  }

  // acc += a b (acc = a b when undefined).
  static void add_mm(Tensor& acc, const Tensor& a, const Tensor& b) {
    if (acc.defined()) {
      acc.addmm_(a, b);
    } else {
      acc = empty({a.size(0), b.size(1)}, a.options());
      mm(acc, a, b);
    }
  }

  // The whole batch is one tile on the GPU.
  template <class F>
  static void for_tiles(int64_t B, int64_t /*tile*/, F&& f) {
    if (B > 0) f(0, 0, B);
  }

  // One stream: two chains of GEMMs run in turn (each GEMM fills the GPU).
  static bool side_by_side_pays(double /*f_macs*/, double /*g_macs*/) { return false; }
  template <class F, class G>
  static void side_by_side(bool /*beside*/, F&& f, G&& g) {
    f();
    g();
  }

  // out = a^T y + c w (w undefined: no such term; c a 0-d tensor, read on the device: no sync).
  static void rank_update(Tensor out, const Tensor& a, const Tensor& y, const Tensor& w, const Tensor& c) {
    mm(out, a.t(), y);
    if (w.defined()) out.addcmul_(w, c);
  }

  static void activation_(const Tensor& h, const Tensor& d, const Tensor& d2, int64_t code, double p0,
                          double p1) {
    RECORD_FUNCTION("jacext::activation_cuda", {});  // named in profiles
    check_cuda_dtype(h);
    const at::cuda::OptionalCUDAGuard device_guard(h.device());
    const int64_t n = h.numel();
    if (n == 0) return;
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacext_activation_cuda", [&] {
      dispatch_activation(code, [&](auto act) {
        launch_kernel(activation_kernel<decltype(act)::value, scalar_t>, blocks_for(n), kThreads, 0,
                      at::cuda::getCurrentCUDAStream(),
                      h.mutable_data_ptr<scalar_t>(), d.mutable_data_ptr<scalar_t>(),
                      d2.defined() ? d2.mutable_data_ptr<scalar_t>() : nullptr, n, static_cast<scalar_t>(p0),
                      static_cast<scalar_t>(p1));
      });
    });
  }

  static void scale(const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in,
                    const Tensor& sample_in, double c, const Tensor& out) {
    const Tensor cols = optional_contiguous(cols_in), rows = optional_contiguous(rows_in);
    const Tensor sample = optional_contiguous(sample_in);
    RECORD_FUNCTION("jacext::scale_cuda", {});
    check_cuda_dtype(out);
    const at::cuda::OptionalCUDAGuard device_guard(out.device());
    Tensor x = x_in.contiguous();
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    if (n * R * N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_scale_cuda", [&] {
      launch_kernel(scale_kernel<scalar_t>, blocks_for(n * R * N), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                    x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(cols), data_or_null<scalar_t>(rows),
                    data_or_null<scalar_t>(sample), static_cast<scalar_t>(c), out.mutable_data_ptr<scalar_t>(), n, R,
                    N, x.size(0) == 1 ? 0 : R * N);
    });
  }

  static void square_sum(const Tensor& x, const Tensor& cols, const Tensor& out) {
    RECORD_FUNCTION("jacext::square_sum_cuda", {});
    reduce_product(x, x, cols, out);
  }

  static void pair_sum(const Tensor& a, const Tensor& c, const Tensor& out) {
    RECORD_FUNCTION("jacext::pair_sum_cuda", {});
    reduce_product(a, c, Tensor(), out);
  }

  static void reduce_product(const Tensor& a_in, const Tensor& c_in, const Tensor& cols_in, const Tensor& out) {
    const Tensor cols = optional_contiguous(cols_in);
    check_cuda_dtype(out);
    const at::cuda::OptionalCUDAGuard device_guard(out.device());
    Tensor a = a_in.contiguous(), c = c_in.contiguous();
    const int64_t R = a.size(1), N = a.size(2);
    if (out.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_reduce_product_cuda", [&] {
      launch_kernel(reduce_product_kernel<scalar_t>, out.numel(), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                    a.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(cols),
                    out.mutable_data_ptr<scalar_t>(), R, N, a.size(0) == 1 ? 0 : R * N, c.size(0) == 1 ? 0 : R * N,
                    out.dim() == 2);
    });
  }

  static void rowwise_dot_scale(const Tensor& r_in, const Tensor& x_in, const Tensor& cols_in, const Tensor& sample_in,
                                double c, const Tensor& d_in, const Tensor& adj_d, const Tensor& out) {
    const Tensor d = optional_contiguous(d_in), cols = optional_contiguous(cols_in);
    const Tensor sample = optional_contiguous(sample_in);
    RECORD_FUNCTION("jacext::rowwise_dot_scale_cuda", {});
    check_cuda_dtype(out);
    const Tensor x = x_in.contiguous();
    const bool unchanged = x.is_same(out) && !cols.defined() && !sample.defined() && c == 1.0 && !d.defined();
    if (!adj_d.defined() && unchanged) return;
    const at::cuda::OptionalCUDAGuard device_guard(out.device());
    Tensor r = r_in.contiguous();
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    if (n * N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_rowwise_dot_scale_cuda", [&] {
      launch_kernel(rowwise_dot_scale_kernel<scalar_t>, blocks_for(n * N), kThreads, 0,
                    at::cuda::getCurrentCUDAStream(),
                    r.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(cols),
                    data_or_null<scalar_t>(sample), static_cast<scalar_t>(c), data_or_null<scalar_t>(d),
                    out.mutable_data_ptr<scalar_t>(), adj_d.defined() ? adj_d.mutable_data_ptr<scalar_t>() : nullptr,
                    n, R, N, r.size(0) == 1 ? 0 : R * N);
    });
  }

  static void batch_sum_(const Tensor& acc, const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in) {
    const Tensor cols = optional_contiguous(cols_in), rows = optional_contiguous(rows_in);
    RECORD_FUNCTION("jacext::batch_sum_cuda", {});
    check_cuda_dtype(acc);
    const at::cuda::OptionalCUDAGuard device_guard(acc.device());
    Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), R = x.size(1), N = x.size(2);
    if (R * N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "jacext_batch_sum_cuda", [&] {
      launch_kernel(batch_sum_kernel<scalar_t>, blocks_for(R * N), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                    acc.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(cols),
                    data_or_null<scalar_t>(rows), n, R, N);
    });
  }

  static void mlp_delta(const Tensor& grad_h_in, const Tensor& d_in, const Tensor& adj_d_in, const Tensor& d2_in,
                        const Tensor& g, const Tensor& grad_b) {
    const Tensor d = optional_contiguous(d_in), adj_d = optional_contiguous(adj_d_in);
    const Tensor d2 = optional_contiguous(d2_in);
    RECORD_FUNCTION("jacext::mlp_delta_cuda", {});
    check_cuda_dtype(g);
    const at::cuda::OptionalCUDAGuard device_guard(g.device());
    Tensor grad_h = optional_contiguous(grad_h_in);
    if (g.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "jacext_mlp_delta_cuda", [&] {
      launch_kernel(mlp_delta_kernel<scalar_t>, blocks_for(g.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                    data_or_null<scalar_t>(grad_h), data_or_null<scalar_t>(d), data_or_null<scalar_t>(adj_d),
                    data_or_null<scalar_t>(d2), g.mutable_data_ptr<scalar_t>(), g.numel());
    });
    // ATen's column sums on the current stream, accumulated in double as the CPU's
    if (grad_b.defined()) grad_b.add_(at::sum(g, {0}, false, at::kDouble));
  }
};

}  // namespace
}  // namespace jacext
