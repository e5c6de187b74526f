// CUDA kernels of the forward-carry ops (Laplacian, Jacobian diagonal, divergence): the fused
// activation-and-carry pass and its backward, on the current stream; the GEMMs (cuBLAS through
// ATen) and the algorithms live in ../mlp_laplacian.h. The GPU runs the whole batch as one tile;
// tensors come from torch's caching allocator. One thread per (sample, unit) walks that unit's
// column through the carry's rows (consecutive threads: consecutive units, coalesced); the sums
// over the tangent rows accumulate in the tensor's own type, as on the CPU.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "../mlp_laplacian.h"
#include "common.cuh"

namespace jacext {
namespace {

// pre = [z; P; q] -> out = [act(z + b); act' P; act' q + act'' sum_{j<squared} P_j^2] (out may be pre).
template <int64_t Code, typename scalar_t>
__global__ void carry_forward_kernel(const scalar_t* pre, const scalar_t* __restrict__ bias, scalar_t* out,
                                     scalar_t* __restrict__ d1, scalar_t* __restrict__ d2, scalar_t* __restrict__ d3,
                                     int64_t n, int64_t R, int64_t N, int64_t columns, bool laplacian,
                                     int64_t squared, scalar_t p0, scalar_t p1) {
  JACEXT_GRID_STRIDE(k, n * N) {
    const int64_t b = k / N, i = k % N;
    const scalar_t* a = pre + b * R * N + i;
    scalar_t* o = out + b * R * N + i;
    const ActDerivs3<scalar_t> r = activation_derivs3<Code, scalar_t>(bias ? a[0] + bias[i] : a[0], p0, p1);
    if (d1) d1[k] = r.d1;
    if (d2) d2[k] = r.d2;
    if (d3) d3[k] = r.d3;
    scalar_t squares = 0;
    for (int64_t j = 1; j <= columns; ++j) {
      const scalar_t p = a[j * N];
      if (j <= squared) squares += p * p;
      o[j * N] = r.d1 * p;
    }
    if (laplacian) o[(1 + columns) * N] = r.d1 * a[(1 + columns) * N] + r.d2 * squares;
    o[0] = r.value;
  }
}

// In place: g = [hbar; Tbar; Deltabar] -> [zbar; Pbar; qbar] (mlp_laplacian.h).
template <typename scalar_t>
__global__ void carry_backward_kernel(scalar_t* g, const scalar_t* __restrict__ pre, const scalar_t* __restrict__ d1,
                                      const scalar_t* __restrict__ d2, const scalar_t* __restrict__ d3,
                                      const scalar_t* __restrict__ adj_d, int64_t n, int64_t R, int64_t N,
                                      int64_t columns, bool laplacian, int64_t squared, bool zero_tangents) {
  JACEXT_GRID_STRIDE(k, n * N) {
    const int64_t b = k / N, i = k % N;
    scalar_t* gb = g + b * R * N + i;
    const scalar_t g1 = d1 ? d1[k] : scalar_t(1);
    const scalar_t deltabar = laplacian ? gb[(1 + columns) * N] : scalar_t(0);
    if (d2) {  // act'' couples the rows: zbar reads every P_j
      const scalar_t* a = pre ? pre + b * R * N + i : nullptr;  // no pre: no rows beyond h
      const scalar_t g2 = d2[k], curvature = scalar_t(2) * g2 * deltabar;
      scalar_t dots = adj_d ? adj_d[k] : scalar_t(0), squares = 0;
      for (int64_t j = 1; j <= columns; ++j) {
        const scalar_t t = zero_tangents ? scalar_t(0) : gb[j * N], p = a[j * N];
        dots += t * p;
        if (j <= squared) {
          squares += p * p;
          gb[j * N] = g1 * t + curvature * p;
        } else {
          gb[j * N] = g1 * t;
        }
      }
      scalar_t z = g1 * gb[0] + g2 * dots;
      if (laplacian) z += deltabar * (g2 * a[(1 + columns) * N] + d3[k] * squares);
      gb[0] = z;
    } else {  // piecewise linear: every row scaled by act'
      for (int64_t j = 1; j <= columns; ++j) gb[j * N] = zero_tangents ? scalar_t(0) : g1 * gb[j * N];
      gb[0] *= g1;
    }
    if (laplacian) gb[(1 + columns) * N] = g1 * deltabar;
  }
}

struct CudaCarryKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static int64_t sum_slots(int64_t /*B*/, int64_t /*tile*/) { return 1; }  // one tile: one sum

  static void mm(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
  static void addmm(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    at::addmm_out(out, bias, a, b);
  }

  // The whole batch is one tile on the GPU.
  template <class F>
  static void for_tiles(int64_t B, int64_t /*tile*/, F&& f) {
    if (B > 0) f(0, 0, B);
  }

  static void carry_forward(const Tensor& pre, const Tensor& bias, const Tensor& out, const Tensor& d1,
                            const Tensor& d2, const Tensor& d3, int64_t code, double p0, double p1,
                            int64_t columns, bool laplacian, int64_t squared) {
    RECORD_FUNCTION("jacext::carry_forward_cuda", {});
    check_cuda_dtype(out);
    const at::cuda::OptionalCUDAGuard device_guard(out.device());
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    TORCH_INTERNAL_ASSERT(pre.is_contiguous() && out.is_contiguous() && R == 1 + columns + (laplacian ? 1 : 0));
    if (n * N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_carry_forward_cuda", [&] {
      dispatch_activation(code, [&](auto act) {
        launch_kernel(carry_forward_kernel<decltype(act)::value, scalar_t>, blocks_for(n * N), kThreads, 0,
                      at::cuda::getCurrentCUDAStream(),
                      pre.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(bias), out.mutable_data_ptr<scalar_t>(),
                      mutable_or_null<scalar_t>(d1), mutable_or_null<scalar_t>(d2), mutable_or_null<scalar_t>(d3), n,
                      R, N, columns, laplacian, squared, static_cast<scalar_t>(p0), static_cast<scalar_t>(p1));
      });
    });
  }

  static void carry_backward(const Tensor& g, const Tensor& pre, const Tensor& d1, const Tensor& d2, const Tensor& d3,
                             const Tensor& adj_d, int64_t columns, bool laplacian, int64_t squared,
                             bool zero_tangents) {
    RECORD_FUNCTION("jacext::carry_backward_cuda", {});
    check_cuda_dtype(g);
    const at::cuda::OptionalCUDAGuard device_guard(g.device());
    const int64_t n = g.size(0), R = g.size(1), N = g.size(2);
    TORCH_INTERNAL_ASSERT(g.is_contiguous() && R == 1 + columns + (laplacian ? 1 : 0));
    TORCH_INTERNAL_ASSERT(!d2.defined() || R == 1 || (pre.defined() && pre.is_contiguous()));
    TORCH_INTERNAL_ASSERT(!zero_tangents || laplacian);
    if (n * N == 0) return;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "jacext_carry_backward_cuda", [&] {
      launch_kernel(carry_backward_kernel<scalar_t>, blocks_for(n * N), kThreads, 0, at::cuda::getCurrentCUDAStream(),
                    g.mutable_data_ptr<scalar_t>(), data_or_null<scalar_t>(pre), data_or_null<scalar_t>(d1),
                    data_or_null<scalar_t>(d2), data_or_null<scalar_t>(d3), data_or_null<scalar_t>(adj_d), n, R, N,
                    columns, laplacian, squared, zero_tangents);
    });
  }
};

}  // namespace

JACEXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("mlp_laplacian", &carry::mlp_laplacian<CudaCarryKernels>);
  m.impl("mlp_laplacian_backward", &carry::mlp_laplacian_backward<CudaCarryKernels>);
  m.impl("mlp_jacobian_diagonal", &carry::mlp_jacobian_diagonal<CudaCarryKernels>);
  m.impl("mlp_jacobian_diagonal_backward", &carry::mlp_jacobian_diagonal_backward<CudaCarryKernels>);
  m.impl("activation_derivatives", &carry::activation_derivatives<CudaCarryKernels>);
}

}  // namespace jacext
