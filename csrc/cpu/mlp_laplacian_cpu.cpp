// CPU kernels of the forward-carry ops (Laplacian, Jacobian diagonal, divergence): the fused
// activation-and-carry pass and its backward, the workspace and the tile loop; the GEMMs and the
// algorithms live in ../mlp_laplacian.h.
//
// Each pass loops over samples with at::parallel_for (split over the threads on a whole batch,
// serial inside a tile's thread); inner loops run over a carry row's contiguous units without
// branches, so that they vectorize. The per-unit sums run over the c tangent rows only (a few to
// a few dozen terms): they accumulate in the tensor's own type, which keeps the loops' full SIMD
// width (double accumulators would halve it for float32).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../mlp_laplacian.h"
#include "../workspace.h"
#include "common.h"

namespace jacext {
namespace {

struct CpuCarryKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return workspace_empty(sizes, options);
  }

  static int64_t sum_slots(int64_t B, int64_t tile) { return TileSchedule(B, tile).slots(); }  // common.h

  static void mm(Tensor out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b); }
  static void addmm(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    at::addmm_out(out, bias, a, b);
  }

  template <class F>
  static void for_tiles(int64_t B, int64_t tile, F&& f) {  // common.h
    jacext::for_tiles(B, tile, std::forward<F>(f));
  }

  // The fused forward pass of one layer (mlp_laplacian.h): pre = [z; P; q] (n, R, N), out =
  // [h; T; Delta], which may be pre itself; d1, d2, d3 (n, N) receive act', act'', act''' where
  // defined; Delta's square sum runs over the first `squared` rows of P. tanh and sigmoid take
  // their value from ATen's vectorized kernels (scalar libm is several times slower) and the
  // derivatives from the value.
  static void carry_forward(const Tensor& pre, const Tensor& bias, const Tensor& out, const Tensor& d1,
                            const Tensor& d2, const Tensor& d3, int64_t code, double p0, double p1,
                            int64_t columns, bool laplacian, int64_t squared) {
    RECORD_FUNCTION("jacext::carry_forward_cpu", {});
    check_cpu_dtype(out);
    const int64_t n = out.size(0), R = out.size(1), N = out.size(2);
    TORCH_INTERNAL_ASSERT(pre.is_contiguous() && out.is_contiguous() && R == 1 + columns + (laplacian ? 1 : 0));
    TORCH_INTERNAL_ASSERT(!laplacian || squared <= columns);
    const bool from_value = code == kTanh || code == kSigmoid;
    if (from_value) {
      Tensor h = out.select(1, 0);
      if (bias.defined()) {
        at::add_out(h, pre.select(1, 0), bias);
      } else if (!pre.is_same(out)) {
        h.copy_(pre.select(1, 0));
      }
      code == kTanh ? h.tanh_() : h.sigmoid_();
    }
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_carry_forward_cpu", [&] {
      const scalar_t* ap = pre.const_data_ptr<scalar_t>();  // may be op
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const scalar_t* bp = data_or_null<scalar_t>(bias);
      scalar_t* d1p = mutable_or_null<scalar_t>(d1);
      scalar_t* d2p = mutable_or_null<scalar_t>(d2);
      scalar_t* d3p = mutable_or_null<scalar_t>(d3);
      const scalar_t a0 = static_cast<scalar_t>(p0), a1 = static_cast<scalar_t>(p1);
      dispatch_activation(code, [&](auto act) {
        constexpr int64_t Code = decltype(act)::value;
        constexpr bool curved = has_curvature(Code);
        at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> local(3 * N);  // one sample's derivatives where they are not saved
          std::vector<scalar_t> squares(laplacian && curved ? N : 0);
          for (int64_t b = begin; b < end; ++b) {
            const scalar_t* a = ap + b * R * N;
            scalar_t* o = op + b * R * N;
            scalar_t* g1 = d1p ? d1p + b * N : local.data();
            scalar_t* g2 = d2p ? d2p + b * N : local.data() + N;
            scalar_t* g3 = d3p ? d3p + b * N : local.data() + 2 * N;
            for (int64_t i = 0; i < N; ++i) {
              ActDerivs3<scalar_t> r;
              if constexpr (Code == kTanh || Code == kSigmoid) {
                r = derivs3_from_value<Code, scalar_t>(o[i]);
              } else {
                r = activation_derivs3<Code, scalar_t>(bp ? a[i] + bp[i] : a[i], a0, a1);
              }
              o[i] = r.value;
              g1[i] = r.d1;
              g2[i] = r.d2;
              g3[i] = r.d3;
            }
            if (R == 1) continue;
            const scalar_t* p = a + N;  // P_j: rows 1..c; q: row c + 1
            scalar_t* t = o + N;
            if (laplacian) {
              const scalar_t* q = a + (1 + columns) * N;
              scalar_t* delta = o + (1 + columns) * N;
              if constexpr (curved) {
                std::fill(squares.begin(), squares.end(), scalar_t(0));
                for (int64_t j = 0; j < squared; ++j) {
                  for (int64_t i = 0; i < N; ++i) squares[i] += p[j * N + i] * p[j * N + i];
                }
                for (int64_t i = 0; i < N; ++i) delta[i] = g1[i] * q[i] + g2[i] * squares[i];
              } else {
                for (int64_t i = 0; i < N; ++i) delta[i] = g1[i] * q[i];
              }
            }
            for (int64_t j = 0; j < columns; ++j) {
              for (int64_t i = 0; i < N; ++i) t[j * N + i] = g1[i] * p[j * N + i];
            }
          }
        });
      });
    });
  }

  // The fused backward pass of one layer, in place: g = [hbar; Tbar; Deltabar] (n, R, N) becomes
  // [zbar; Pbar; qbar] (mlp_laplacian.h); pre = [z; P; q] is read only through act'' (undefined
  // without it); adj_d (n, N): an extra adjoint of act'; zero_tangents: Tbar is zero (unwritten);
  // Delta's square sum reads the first `squared` rows of P.
  static void carry_backward(const Tensor& g, const Tensor& pre, const Tensor& d1, const Tensor& d2, const Tensor& d3,
                             const Tensor& adj_d, int64_t columns, bool laplacian, int64_t squared,
                             bool zero_tangents) {
    RECORD_FUNCTION("jacext::carry_backward_cpu", {});
    check_cpu_dtype(g);
    const int64_t n = g.size(0), R = g.size(1), N = g.size(2);
    TORCH_INTERNAL_ASSERT(g.is_contiguous() && R == 1 + columns + (laplacian ? 1 : 0));
    TORCH_INTERNAL_ASSERT(!d2.defined() || R == 1 || (pre.defined() && pre.is_contiguous()));
    TORCH_INTERNAL_ASSERT(!zero_tangents || laplacian);
    TORCH_INTERNAL_ASSERT(!laplacian || squared <= columns);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "jacext_carry_backward_cpu", [&] {
      scalar_t* gp = g.mutable_data_ptr<scalar_t>();
      const scalar_t* ap = data_or_null<scalar_t>(pre);
      const scalar_t* d1p = data_or_null<scalar_t>(d1);
      const scalar_t* d2p = data_or_null<scalar_t>(d2);
      const scalar_t* d3p = data_or_null<scalar_t>(d3);
      const scalar_t* xp = data_or_null<scalar_t>(adj_d);
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        const std::vector<scalar_t> ones(d1p ? 0 : N, scalar_t(1));  // an identity layer's act'
        std::vector<scalar_t> dots(N), squares(N), curvature(N);
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* hbar = gp + b * R * N;
          scalar_t* tbar = hbar + N;
          scalar_t* deltabar = hbar + (1 + columns) * N;
          const scalar_t* g1 = d1p ? d1p + b * N : ones.data();
          if (d2p) {  // act'' couples the rows: zbar reads every P_j
            const scalar_t* g2 = d2p + b * N;
            const scalar_t* p = ap ? ap + b * R * N + N : nullptr;  // no pre: no rows beyond h
            std::fill(dots.begin(), dots.end(), scalar_t(0));
            std::fill(squares.begin(), squares.end(), scalar_t(0));
            if (laplacian) {  // Pbar_j = act' Tbar_j + 2 act'' Deltabar P_j
              for (int64_t i = 0; i < N; ++i) curvature[i] = scalar_t(2) * g2[i] * deltabar[i];
            }
            for (int64_t j = 0; j < columns; ++j) {
              scalar_t* tj = tbar + j * N;
              const scalar_t* pj = p + j * N;
              const bool in_delta = laplacian && j < squared;
              if (zero_tangents && !in_delta) {
                std::fill(tj, tj + N, scalar_t(0));
              } else if (zero_tangents) {
                for (int64_t i = 0; i < N; ++i) {
                  squares[i] += pj[i] * pj[i];
                  tj[i] = curvature[i] * pj[i];
                }
              } else if (in_delta) {
                for (int64_t i = 0; i < N; ++i) {
                  dots[i] += tj[i] * pj[i];
                  squares[i] += pj[i] * pj[i];
                  tj[i] = g1[i] * tj[i] + curvature[i] * pj[i];
                }
              } else {
                for (int64_t i = 0; i < N; ++i) {
                  dots[i] += tj[i] * pj[i];
                  tj[i] *= g1[i];
                }
              }
            }
            if (xp) {
              for (int64_t i = 0; i < N; ++i) dots[i] += xp[b * N + i];
            }
            if (laplacian) {
              const scalar_t* q = ap + b * R * N + (1 + columns) * N;
              const scalar_t* g3 = d3p + b * N;
              for (int64_t i = 0; i < N; ++i) {
                hbar[i] = g1[i] * hbar[i] + g2[i] * dots[i] + deltabar[i] * (g2[i] * q[i] + g3[i] * squares[i]);
              }
            } else {
              for (int64_t i = 0; i < N; ++i) hbar[i] = g1[i] * hbar[i] + g2[i] * dots[i];
            }
          } else {  // piecewise linear: every row scaled by act'
            for (int64_t j = 0; j < columns; ++j) {
              scalar_t* tj = tbar + j * N;
              if (zero_tangents) {
                std::fill(tj, tj + N, scalar_t(0));
              } else {
                for (int64_t i = 0; i < N; ++i) tj[i] *= g1[i];
              }
            }
            for (int64_t i = 0; i < N; ++i) hbar[i] *= g1[i];
          }
          if (laplacian) {
            for (int64_t i = 0; i < N; ++i) deltabar[i] *= g1[i];
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(jacext, CPU, m) {
  m.impl("mlp_laplacian", &carry::mlp_laplacian<CpuCarryKernels>);
  m.impl("mlp_laplacian_backward", &carry::mlp_laplacian_backward<CpuCarryKernels>);
  m.impl("mlp_jacobian_diagonal", &carry::mlp_jacobian_diagonal<CpuCarryKernels>);
  m.impl("mlp_jacobian_diagonal_backward", &carry::mlp_jacobian_diagonal_backward<CpuCarryKernels>);
  m.impl("activation_derivatives", &carry::activation_derivatives<CpuCarryKernels>);
}

}  // namespace jacext
