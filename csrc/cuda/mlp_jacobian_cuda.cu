// CUDA kernels of the MLP-Jacobian ops: the elementwise passes and reductions, on the current
// stream; the GEMMs (cuBLAS through ATen) and the algorithms themselves live in
// ../mlp_jacobian.h and ../mlp_flow.h.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../mlp_flow.h"
#include "../mlp_jacobian.h"

namespace jacext {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

void check_cuda_dtype(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CUDA kernels support float32 and float64, got ", t.scalar_type());
}

template <int64_t Code, typename scalar_t>
__global__ void activation_forward_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ h,
                                          scalar_t* __restrict__ d, scalar_t* __restrict__ d2,
                                          int64_t n, scalar_t p0, scalar_t p1) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    ActDerivs<scalar_t> r = activation_derivs<Code, scalar_t>(y[i], p0, p1);
    h[i] = r.value;
    d[i] = r.d1;
    d2[i] = r.d2;
  }
}

// One block per sample: sq[b] = sum_{r,j} (x[b,r,j] * d[b,j])^2.
template <typename scalar_t, typename acc_t>
__global__ void scaled_square_sum_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ d,
                                         scalar_t* __restrict__ sq, int64_t R, int64_t N) {
  const int64_t b = blockIdx.x;
  const scalar_t* xb = x + b * R * N;
  acc_t total = 0;
  for (int64_t i = threadIdx.x; i < R * N; i += blockDim.x) {
    acc_t v = static_cast<acc_t>(xb[i]) * (d ? d[b * N + i % N] : scalar_t(1));
    total += v * v;
  }
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sq[b] = static_cast<scalar_t>(partial[0]);
}

// One thread per (b, j): out[b,j] = sum_r x[b,r,j] * y[b,r,j] (consecutive j: coalesced reads);
// y_batch_stride is 0 when y is the same for every sample.
template <typename scalar_t, typename acc_t>
__global__ void rowwise_dot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                   scalar_t* __restrict__ out, int64_t B, int64_t R, int64_t N,
                                   int64_t y_batch_stride) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < B * N;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / N, j = i % N;
    const scalar_t* xb = x + b * R * N + j;
    const scalar_t* yb = y + b * y_batch_stride + j;
    acc_t acc = 0;
    for (int64_t r = 0; r < R; ++r) acc += static_cast<acc_t>(xb[r * N]) * yb[r * N];
    out[i] = static_cast<scalar_t>(acc);
  }
}

struct CudaKernels {
  // h = act(y), d = act'(y), d2 = act''(y) in one pass.
  static std::tuple<Tensor, Tensor, Tensor> activation_forward(const Tensor& y_in, int64_t code,
                                                               double p0, double p1) {
    RECORD_FUNCTION("jacext::activation_forward_cuda", {});  // named in profiles
    check_cuda_dtype(y_in);
    const at::cuda::OptionalCUDAGuard device_guard(y_in.device());
    Tensor y = y_in.contiguous();
    Tensor h = at::empty_like(y), d = at::empty_like(y), d2 = at::empty_like(y);
    const int64_t n = y.numel();
    if (n == 0) return {h, d, d2};
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "jacext_activation_forward_cuda", [&] {
      dispatch_activation(code, [&](auto act) {
        activation_forward_kernel<decltype(act)::value, scalar_t>
            <<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                y.const_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
                d.mutable_data_ptr<scalar_t>(), d2.mutable_data_ptr<scalar_t>(), n,
                static_cast<scalar_t>(p0), static_cast<scalar_t>(p1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return {h, d, d2};
  }

  static Tensor scaled_square_sum(const Tensor& x_in, const Tensor& d_in) {
    RECORD_FUNCTION("jacext::scaled_square_sum_cuda", {});  // named in profiles
    check_cuda_dtype(x_in);
    const at::cuda::OptionalCUDAGuard device_guard(x_in.device());
    Tensor x = x_in.contiguous();
    Tensor d = d_in.defined() ? d_in.contiguous() : d_in;
    const int64_t B = x.size(0), R = x.size(1), N = x.size(2);
    Tensor sq = at::empty({B}, x.options());
    if (B == 0) return sq;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jacext_scaled_square_sum_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      scaled_square_sum_kernel<scalar_t, acc_t>
          <<<B, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), d.defined() ? d.const_data_ptr<scalar_t>() : nullptr,
              sq.mutable_data_ptr<scalar_t>(), R, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return sq;
  }

  static Tensor rowwise_dot(const Tensor& x_in, const Tensor& y_in) {
    RECORD_FUNCTION("jacext::rowwise_dot_cuda", {});  // named in profiles
    check_cuda_dtype(x_in);
    const at::cuda::OptionalCUDAGuard device_guard(x_in.device());
    Tensor x = x_in.contiguous(), y = y_in.contiguous();
    const int64_t B = x.size(0), R = x.size(1), N = x.size(2);
    const int64_t y_batch_stride = y.size(0) == 1 ? 0 : R * N;
    Tensor out = at::empty({B, N}, x.options());
    if (B * N == 0) return out;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jacext_rowwise_dot_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      rowwise_dot_kernel<scalar_t, acc_t>
          <<<blocks_for(B * N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), B, R, N, y_batch_stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(jacext, CUDA, m) {
  m.impl("mlp_jacobian_frobenius", &mlp_jacobian_frobenius<CudaKernels>);
  m.impl("mlp_jacobian", &mlp_jacobian<CudaKernels>);
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward<CudaKernels>);
  m.impl("mlp_flow", &mlp_flow<CudaKernels>);
  m.impl("mlp_flow_backward", &mlp_flow_backward<CudaKernels>);
}

}  // namespace jacext
