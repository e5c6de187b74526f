// CPU kernels of the MLP-Jacobian ops: the fused elementwise passes and reductions, the workspace
// and the tile loop; the GEMMs and the algorithms themselves live in ../mlp_jacobian.h and
// ../mlp_flow.h.
//
// Every pass loops over samples with at::parallel_for: on a whole batch (tile 0) it splits the
// samples over the threads; inside a tile it runs on the tile's worker alone (at::parallel_for does
// not nest), as do ATen's kernels and MKL's GEMMs called from it. Inner loops run over the
// contiguous last dimension without branches, so that the compiler vectorizes them; sums
// accumulate in double (at::acc_type), as on CUDA.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../mlp_flow.h"
#include "../mlp_jacobian.h"
#include "../workspace.h"

namespace jacext {
namespace {

constexpr int64_t kGrain = 2048;  // elements per thread below which a pass runs on one thread
constexpr int64_t kFewRows = 256, kSplitColumns = 512;  // CpuKernels::product
constexpr int64_t kSmallRank = 32;                      // CpuKernels::rank_update

void check_cpu_dtype(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CPU kernels support float32 and float64, got ", t.scalar_type());
}

// Samples per parallel chunk for a pass of `per_sample` elements per sample.
int64_t sample_grain(int64_t per_sample) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_sample, 1)); }

// An optional input's data (nullptr when undefined); callers pass contiguous tensors (contiguous()).
template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

Tensor contiguous(const Tensor& t) { return t.defined() ? t.contiguous() : t; }

struct CpuKernels {
  static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return workspace_empty(sizes, options);
  }

  static int64_t max_workers() { return at::get_num_threads(); }

  // out = a b and out = bias + a b, into any tensor (a view). MKL runs a product with few rows
  // (a small batch) on one thread; outside tiles, its columns are split over the threads instead
  // (measured: 10 x 784 x 784 in 0.66x the time, 100 x 1024 x 1024 in 0.88x).
  static void mm(Tensor out, const Tensor& a, const Tensor& b) { product(out, Tensor(), a, b); }
  static void addmm(Tensor out, const Tensor& bias, const Tensor& a, const Tensor& b) { product(out, bias, a, b); }

  static void product(Tensor& out, const Tensor& bias, const Tensor& a, const Tensor& b) {
    const int64_t n = b.size(1);
    if (a.size(0) > kFewRows || n < kSplitColumns || at::in_parallel_region() || at::get_num_threads() < 2) {
      bias.defined() ? at::addmm_out(out, bias, a, b) : at::mm_out(out, a, b);
      return;
    }
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, n, kSplitColumns / 4, [&](int64_t c0, int64_t c1) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      Tensor part = out.narrow(1, c0, c1 - c0);
      if (bias.defined()) {
        at::addmm_out(part, bias.narrow(0, c0, c1 - c0), a, b.narrow(1, c0, c1 - c0));
      } else {
        at::mm_out(part, a, b.narrow(1, c0, c1 - c0));
      }
    });
  }

  // f(worker, first sample, samples) for each tile of `tile` samples (0: one tile of B), the tiles
  // spread over the threads; worker is the thread's index, for its own gradient sums.
  template <class F>
  static void for_tiles(int64_t B, int64_t tile, F&& f) {
    if (B == 0) return;
    if (tile == 0 || tile >= B) {
      f(0, 0, B);
      return;
    }
    const int64_t n_tiles = (B + tile - 1) / tile;
    // The op runs below autograd: its worker threads must too (dispatch keys, grad mode, ...).
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, n_tiles, 1, [&](int64_t first, int64_t last) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      const int64_t worker = at::get_thread_num();
      for (int64_t t = first; t < last; ++t) f(worker, t * tile, std::min(tile, B - t * tile));
    });
  }

  // In place: h holds y on entry and act(y) on exit; d = act'(y) and d2 = act''(y) where defined.
  static void activation_(const Tensor& h, const Tensor& d, const Tensor& d2, int64_t code, double p0,
                          double p1) {
    RECORD_FUNCTION("jacext::activation_cpu", {});  // named in profiles
    check_cpu_dtype(h);
    TORCH_INTERNAL_ASSERT(h.is_contiguous() && d.is_contiguous() && (!d2.defined() || d2.is_contiguous()));
    if (code == kTanh || code == kSigmoid) return from_value(h, d, d2, code);
    if (code == kSiLU || code == kSoftplus || code == kSmoothLeakyReLU) return from_sigmoid(h, d, d2, code, p0, p1);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "jacext_activation_cpu", [&] {
      scalar_t* hp = h.mutable_data_ptr<scalar_t>();
      scalar_t* dp = d.mutable_data_ptr<scalar_t>();
      scalar_t* d2p = d2.defined() ? d2.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t a = static_cast<scalar_t>(p0), c = static_cast<scalar_t>(p1);
      dispatch_activation(code, [&](auto act) {
        at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
          if (d2p) {
            for (int64_t i = begin; i < end; ++i) {
              ActDerivs<scalar_t> r = activation_derivs<decltype(act)::value, scalar_t>(hp[i], a, c);
              hp[i] = r.value;
              dp[i] = r.d1;
              d2p[i] = r.d2;
            }
          } else {  // piecewise linear: no act''
            for (int64_t i = begin; i < end; ++i) {
              ActDerivs<scalar_t> r = activation_derivs<decltype(act)::value, scalar_t>(hp[i], a, c);
              hp[i] = r.value;
              dp[i] = r.d1;
            }
          }
        });
      });
    });
  }

  // tanh and sigmoid: the value from ATen's vectorized kernel (scalar libm is about 10x slower),
  // then both derivatives from the value, as in activations.h, in one loop the compiler
  // vectorizes: tanh' = 1 - t^2, tanh'' = -2 t tanh'; s' = s (1 - s), s'' = s' (1 - 2 s).
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
      const bool is_tanh = code == kTanh;
      at::parallel_for(0, h.numel(), kGrain, [&](int64_t begin, int64_t end) {
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
  }

  // silu, softplus and smooth_leaky_relu: sigmoid(u) and log1p(exp(-|u|)) (u = y, or beta y for
  // softplus) from ATen's vectorized kernels into workspace temporaries, the rest by the formulas
  // of activations.h in one loop without transcendental calls.
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
        for (int64_t i = begin; i < end; ++i) {
          const scalar_t v = hp[i], uv = up[i], s = sp[i], ds = s * (scalar_t(1) - s);
          const scalar_t softplus = (uv > scalar_t(0) ? uv : scalar_t(0)) + tp[i];
          if (code == kSiLU) {
            hp[i] = v * s;
            dp[i] = s + v * ds;
            d2p[i] = ds * (scalar_t(2) + v * (scalar_t(1) - scalar_t(2) * s));
          } else if (code == kSoftplus) {  // linear above beta y > threshold, as torch
            const bool linear = uv > threshold;
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
  }

  // out[b,r,j] = c * x[b',r,j] * cols[b,j] * rows[b,r] * sample[b] for out (n, R, N), where
  // b' = b, or 0 when x has one sample (a weight broadcast over the batch); an undefined factor
  // is 1. The one scaling pass: D_k before a GEMM, the first carries, the loss's factor 2 g_b.
  static void scale(const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in,
                    const Tensor& sample_in, double c, const Tensor& out) {
    const Tensor cols = contiguous(cols_in), rows = contiguous(rows_in), sample = contiguous(sample_in);
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
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* xb = xp + b * x_stride;
          const scalar_t* cb = cp ? cp + b * N : nullptr;
          scalar_t* ob = op + b * R * N;
          const scalar_t factor = static_cast<scalar_t>(c) * (sp ? sp[b] : scalar_t(1));
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t f = rp ? factor * rp[b * R + r] : factor;
            const scalar_t* xr = xb + r * N;
            scalar_t* orow = ob + r * N;
            if (cb) {
              for (int64_t j = 0; j < N; ++j) orow[j] = xr[j] * cb[j] * f;
            } else {
              for (int64_t j = 0; j < N; ++j) orow[j] = xr[j] * f;
            }
          }
        }
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
    const Tensor cols = contiguous(cols_in);
    check_cpu_dtype(out);
    Tensor a = a_in.contiguous(), c = c_in.contiguous();
    const int64_t n = out.size(0), R = a.size(1), N = a.size(2);
    const int64_t a_stride = a.size(0) == 1 ? 0 : R * N, c_stride = c.size(0) == 1 ? 0 : R * N;
    const bool per_row = out.dim() == 2;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_reduce_product_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* cp = c.const_data_ptr<scalar_t>();
      const scalar_t* wp = data_or_null<scalar_t>(cols);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* wb = wp ? wp + b * N : nullptr;
          acc_t total = 0;
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t* ar = ap + b * a_stride + r * N;
            const scalar_t* cr = cp + b * c_stride + r * N;
            acc_t row = 0;
            if (wb) {
              for (int64_t j = 0; j < N; ++j) row += static_cast<acc_t>(ar[j] * wb[j]) * (cr[j] * wb[j]);
            } else {
              for (int64_t j = 0; j < N; ++j) row += static_cast<acc_t>(ar[j]) * cr[j];
            }
            if (per_row) op[b * R + r] = static_cast<scalar_t>(row);
            total += row;
          }
          if (!per_row) op[b] = static_cast<scalar_t>(total);
        }
      });
    });
  }

  // adj_d[b,j] = sum_r r[b',r,j] * adj[b,r,j] (where adj_d is defined; r may be broadcast), then
  // adj *= d (columns, where d is defined), in place: the backward's step through a diagonal.
  static void rowwise_dot_scale_(const Tensor& r_in, const Tensor& adj, const Tensor& d_in, const Tensor& adj_d) {
    const Tensor d = contiguous(d_in);
    RECORD_FUNCTION("jacext::rowwise_dot_scale_cpu", {});
    check_cpu_dtype(adj);
    TORCH_INTERNAL_ASSERT(adj.is_contiguous());
    if (!adj_d.defined() && !d.defined()) return;
    Tensor r = r_in.contiguous();
    const int64_t n = adj.size(0), R = adj.size(1), N = adj.size(2);
    const int64_t r_stride = r.size(0) == 1 ? 0 : R * N;
    AT_DISPATCH_FLOATING_TYPES(adj.scalar_type(), "jacext_rowwise_dot_scale_cpu", [&] {
      using acc_t = at::acc_type<scalar_t, false>;
      const scalar_t* rp = r.const_data_ptr<scalar_t>();
      const scalar_t* dp = data_or_null<scalar_t>(d);
      scalar_t* ap = adj.mutable_data_ptr<scalar_t>();
      scalar_t* op = adj_d.defined() ? adj_d.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, n, sample_grain(R * N), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(op ? N : 0);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          const scalar_t* db = dp ? dp + b * N : nullptr;
          for (int64_t row = 0; row < R; ++row) {
            const scalar_t* rr = rp + b * r_stride + row * N;
            scalar_t* ar = ap + (b * R + row) * N;
            if (op) {
              for (int64_t j = 0; j < N; ++j) acc[j] += static_cast<acc_t>(rr[j]) * ar[j];
            }
            if (db) {
              for (int64_t j = 0; j < N; ++j) ar[j] *= db[j];
            }
          }
          for (int64_t j = 0; j < (op ? N : 0); ++j) op[b * N + j] = static_cast<scalar_t>(acc[j]);
        }
      });
    });
  }

  // acc[r,j] += sum_b x[b,r,j] * cols[b,j] * rows[b,r] (undefined factors are 1): a weight
  // gradient of a carry formed from a broadcast weight.
  static void batch_sum_(const Tensor& acc, const Tensor& x_in, const Tensor& cols_in, const Tensor& rows_in) {
    const Tensor cols = contiguous(cols_in), rows = contiguous(rows_in);
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
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* ar = ap + r * N;
          for (int64_t b = 0; b < n; ++b) {
            const scalar_t* xr = xp + (b * R + r) * N;
            const scalar_t f = rp ? rp[b * R + r] : scalar_t(1);
            if (cp) {
              const scalar_t* cb = cp + b * N;
              for (int64_t j = 0; j < N; ++j) ar[j] += xr[j] * cb[j] * f;
            } else {
              for (int64_t j = 0; j < N; ++j) ar[j] += xr[j] * f;
            }
          }
        }
      });
    });
  }

  // out = a^T y + c w for a (k, R), y (k, N) and w (R, N) (w undefined: no such term; c a 0-d
  // tensor): the flow's relative gradient delta^T (Y W) with log|det W|'s term. For a small batch k
  // one pass over out, row by row (MKL runs a rank-k product at half speed there, and the c w term
  // would be a second pass); a larger batch goes to the GEMM.
  static void rank_update(Tensor out, const Tensor& a_in, const Tensor& y_in, const Tensor& w_in, const Tensor& c) {
    RECORD_FUNCTION("jacext::rank_update_cpu", {});
    check_cpu_dtype(out);
    const int64_t k = a_in.size(0), R = out.size(0), N = out.size(1);
    if (k > kSmallRank) {
      mm(out, a_in.t(), y_in);
      if (w_in.defined()) out.addcmul_(w_in, c);
      return;
    }
    Tensor a = a_in.contiguous(), y = y_in.contiguous(), w = contiguous(w_in);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "jacext_rank_update_cpu", [&] {
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* wp = data_or_null<scalar_t>(w);
      const scalar_t cw = wp ? c.item<scalar_t>() : scalar_t(0);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(k * N, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* orow = op + r * N;
          if (wp) {
            for (int64_t j = 0; j < N; ++j) orow[j] = cw * wp[r * N + j];
          } else {
            for (int64_t j = 0; j < N; ++j) orow[j] = scalar_t(0);
          }
          for (int64_t b = 0; b < k; ++b) {
            const scalar_t f = ap[b * R + r];
            const scalar_t* yb = yp + b * N;
            for (int64_t j = 0; j < N; ++j) orow[j] += f * yb[j];
          }
        }
      });
    });
  }

  // g = grad_h * d + adj_d * d2 (absent terms left out; an absent d is 1) and grad_b += sum_b g:
  // the MLP backward's d/dy with its bias gradient, in one pass.
  static void mlp_delta(const Tensor& grad_h_in, const Tensor& d_in, const Tensor& adj_d_in, const Tensor& d2_in,
                        const Tensor& g, const Tensor& grad_b) {
    const Tensor d = contiguous(d_in), adj_d = contiguous(adj_d_in), d2 = contiguous(d2_in);
    RECORD_FUNCTION("jacext::mlp_delta_cpu", {});
    check_cpu_dtype(g);
    Tensor grad_h = contiguous(grad_h_in);
    const int64_t n = g.size(0), N = g.size(1);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "jacext_mlp_delta_cpu", [&] {
      const scalar_t* hp = data_or_null<scalar_t>(grad_h);
      const scalar_t* dp = data_or_null<scalar_t>(d);
      const scalar_t* ap = data_or_null<scalar_t>(adj_d);
      const scalar_t* d2p = data_or_null<scalar_t>(d2);
      scalar_t* gp = g.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, sample_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* gb = gp + b * N;
          const int64_t o = b * N;
          if (hp && dp) {
            for (int64_t j = 0; j < N; ++j) gb[j] = hp[o + j] * dp[o + j];
          } else if (hp) {
            for (int64_t j = 0; j < N; ++j) gb[j] = hp[o + j];
          } else {
            for (int64_t j = 0; j < N; ++j) gb[j] = scalar_t(0);
          }
          if (ap && d2p) {
            for (int64_t j = 0; j < N; ++j) gb[j] += ap[o + j] * d2p[o + j];
          }
        }
      });
      if (grad_b.defined()) {  // columns split over the threads
        scalar_t* bp = grad_b.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
          for (int64_t b = 0; b < n; ++b) {
            for (int64_t j = begin; j < end; ++j) bp[j] += gp[b * N + j];
          }
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
