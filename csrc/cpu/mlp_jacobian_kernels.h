// CpuKernels, the CPU kernels of the MLP-Jacobian and flow ops: the fused elementwise passes and
// reductions, the workspace and the tile loop; the GEMMs and the algorithms themselves live in
// ../mlp_jacobian.h and ../mlp_flow.h.
//
// Every pass loops over samples with at::parallel_for: on a whole batch (tile 0) it splits the
// samples over the threads; inside a tile it runs on the tile's thread alone (at::parallel_for does
// not nest), as do ATen's kernels and MKL's GEMMs called from it. The loops themselves are plain
// functions over raw pointers (micro_kernels.h), each compiled for AVX2 + FMA and for the
// baseline; inner loops run over the contiguous last dimension without branches, so that the
// compiler vectorizes them; sums accumulate in double (at::acc_type), as on CUDA.
//
// Included by mlp_jacobian_cpu.cpp and mlp_flow_cpu.cpp, which register the two op families.
#pragma once
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "../device_formulas.h"
#include "../mlp_common.h"
#include "../workspace.h"
#include "common.h"
#include "micro_kernels.h"

namespace jacext {
namespace {

constexpr int64_t kFewRows = 256, kSplitColumns = 512;  // CpuKernels::product
// rank_update_rows up to this k; MKL beyond (docs/benchmarks.md)
constexpr int64_t kSmallRank = 16;
// small_product_nt for at most kSmallRows rows and at least kSmallDepth columns, where it beats
// MKL's GEMM; shallower products are MKL's (docs/benchmarks.md)
constexpr int64_t kSmallRows = 24, kSmallDepth = 256;

struct CpuKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return workspace_empty(sizes, options);
  }

  static int64_t sum_slots(int64_t B, int64_t tile) { return TileSchedule(B, tile).slots(); }  // common.h

  // out = a b and out = bias + a b, into any tensor (a view). MKL runs a product with few rows
  // (a small batch) on one thread; outside tiles, its columns are split over the threads instead.
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

  // tanh and sigmoid: the value from ATen's vectorized kernel (scalar libm is several times slower),
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
}  // namespace jacext
