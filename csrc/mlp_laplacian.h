// The forward-carry ops, written once for every device: the exact Laplacian (with the input
// gradient) of an MLP, and the Jacobian diagonal, divergence and Hutchinson divergence of a square
// one (n_L = n_0).
//
// Notation as in mlp_jacobian.h (0-based: W[i] is n_{i+1} x n_i, h_0 = x, y_{i+1} = h_i W[i]^T + b[i],
// h_{i+1} = act_i(y_{i+1})). Per sample, the carry after layer i is C_{i+1} = [h; T; Delta], R rows
// of n_{i+1}:
//   h      the activation (1 row);
//   T      c tangent rows, T_j = dh/dx t_j: for t_j the unit vectors (c = n_0, so T = J^T, the
//          Jacobian's columns), k random projections v_j (c = k), or the Laplacian's directions
//          v_j (c rows given by the caller); c = 0 carries h alone;
//   Delta  (Laplacian only) sum_{j<s} t_j^T (d^2 h / dx^2) t_j over the first s tangent rows
//          (`squared`; s = c = n_0 with the unit vectors: the Laplacian sum_j d^2 h / dx_j^2).
// C_0 = [x; I or V; 0]. Each layer is one GEMM over the tile's stacked rows, A = C W[i]^T = [z; P; q],
// and one fused pass (Kernels::carry_forward) with the bias on the h rows:
//   h = act(z + b),  T_j = act'(.) P_j,  Delta = act'(.) q + act''(.) sum_{j<s} P_j^2.
// The backward is the adjoint sweep, one fused pass per layer (Kernels::carry_backward)
//   zbar   = act' hbar + act'' (sum_j Tbar_j P_j + dbar) + Deltabar (act'' q + act''' sum_{j<s} P_j^2)
//   Pbar_j = act' Tbar_j + 2 act'' Deltabar P_j (the last term for j < s only),  qbar = act' Deltabar
// (dbar: an epilogue's own adjoint of act'), then Wbar += Abar^T C and Cbar = Abar W[i], two
// GEMMs over the stacked rows, and bbar += the zbar rows.
//
// Residual skips (h + g(h)): `residual` names, per layer i, -1 or a j <= i of the same width, and
// the carry after layer i becomes C_{i+1} = f_i(C_i) + C_j, every row added (h, T and Delta are all
// linear in the skip). The backward keeps the adjoint of C_{i+1} pending until the sweep reaches C_j,
// and adds it to C_j's adjoint there. The closed forms and the Laplacian's thin last layer map h
// alone or skip the T rows, so they do not apply across a skip (a skip into the last layer keeps
// every row through it; the diagonal then reads T_ii off the top carry).
//
// Conditioning inside the net (`sample_biases`, `gates`): per layer i, a per-sample bias s_i and a
// per-sample pre-activation gate g_i (B, n_{i+1}), z = g .* (h W[i]^T) + b + s (a conditioning input
// concatenated into a hidden Linear gives s = c W_c^T; FFJORD's ConcatSquash (W h + b) .* sigmoid(A t)
// + C t gives g and s). The gate scales every row of A (T and Delta are linear in A's rows, and the
// fused pass then gives T = act' g P, Delta = act' g q + act'' g^2 sum P^2); the bias shifts the h
// row alone. Backward, with Abar the pass's adjoint of the scaled rows: sbar = Abar's h row (the bias
// gradient before the batch sum), gbar = sum over rows of Abar .* (C W[i]^T) (the unscaled rows,
// recomputed: one GEMM), and the weights and the carry see Abar .* g. The closed forms do not apply;
// a conditioned last layer keeps every row through it (the epilogues that map h alone or read
// T off the row-dot with the last weight assume z = h W^T + b there).
//
// Dropout masks (`masks`): per layer i, a constant per-sample diagonal factor m_i (B, n_{i+1}) after
// the activation, h = m .* act(z). Every row of the carry is linear in h's layer map, so the fused
// pass's output is scaled by m, row by row: h = m act(.), T_j = m act'(.) P_j, Delta = m (act' q +
// act'' sum P^2) (before a skip adds its carry, as the module applies dropout before the sum). The
// backward scales the adjoint of every row by m before the fused pass; act', act'' and act''' are
// saved unscaled. A mask takes no gradient. The closed forms refuse masks (their matrices are the
// same for every sample); a masked last layer keeps every row through it, as a conditioned one.
//
// The first `carried` layers carry every row; what happens above them is the op's epilogue:
//   Laplacian: every layer (y, J and Delta from C_L); with a linear output layer and no gradient
//     asked for, the last layer maps only h and Delta (y = h W^T + b, Delta_out = Delta W^T): two
//     thin GEMMs instead of one over the n_0 + 2 rows.
//   Diagonal, kForward: the n_0 columns up to layer L-1, then diag_i = act_L'(.)_i e_i with
//     e_i = sum_k W[L-1][i,k] T_i[k]: a row-wise dot with the last weight, never the last GEMM
//     (L = 1: T = I, e = diag W[0]). With projections: k columns through every layer, then
//     v_j . T_j (B, k).
//   Diagonal, kGram1 (one hidden layer): J = D_2 W_2 D_1 W_1 gives diag = d_2 .* (d_1 M) with
//     M = W_1 .* W_2^T (n_1 x n_0) once per batch: one GEMM of the batch instead of any carry.
//   Trace, kTraceGram2 (two hidden layers, linear output): tr(W_3 D_2 W_2 D_1 W_1)
//     = d_2^T M d_1 with M = W_2 .* (W_1 W_3)^T (n_2 x n_1) once per batch: out (B) = trace.
// The closed forms carry h alone (c = 0): the MLP forward with act' and act'' saved, and their
// backward passes each layer the adjoint of its act' (dbar).
//
// `saved` (the same layout for both ops; an absent tensor is an empty 1-d one): act', act'' and
// act''' of every layer (act' absent for identity layers, act'' for piecewise-linear ones, act'''
// outside the Laplacian), the carries C_1..C_{L-1}, the pre-activation rows A of every layer whose
// backward reads them (a carried layer with act'', when rows > 1), then one epilogue tensor: e
// (B, n) for kForward without projections and kGram1, u = d_1 M^T (B, n_2) for kTraceGram2.
//
// Tiles as in mlp_jacobian.h: a thread takes a tile of samples through every layer, forward or
// backward, its carries in cache; weight gradients are summed per slot (cpu/common.h TileSchedule).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <optional>
#include <tuple>
#include <vector>

#include "activations.h"
#include "mlp_common.h"

namespace jacext {
namespace carry {

enum DiagonalStrategy : int64_t { kForward = 0, kGram1 = 1, kTraceGram2 = 2 };

// What one slot sums over its tiles: weight and bias gradients per layer, and a closed form's
// dM = sum_b (adjoint) (d_1)^T. Undefined until a tile adds to it.
struct CarrySums {
  std::vector<Tensor> w, b;
  Tensor m;
  explicit CarrySums(int64_t layers) : w(layers), b(layers) {}
};

// The batch's `saved` tensors (layout above).
struct CarrySaved {
  std::vector<Tensor> d1, d2, d3, hidden, pre;
  Tensor extra;
};

template <class Kernels>
struct ForwardCarry {
  at::TensorList weights;
  at::TensorList biases;
  at::IntArrayRef activations;
  at::ArrayRef<double> act_params;
  int64_t columns;       // c tangent rows
  bool laplacian;        // the Delta row
  int64_t carried;       // layers that carry every row
  Tensor projections;    // (B, c, n_0) tangents v_j, or undefined (unit vectors, or c = 0)
  int64_t squared = 0;   // Laplacian: Delta sums over the first `squared` tangent rows
  std::vector<int64_t> residual;  // per layer: the skip's j, or -1; empty without skips
  // per layer: the per-sample bias, gate and dropout mask (B, n_{i+1}), undefined for none (always
  // L entries)
  std::vector<Tensor> sample_biases, gates, masks;

  int64_t skip(int64_t i) const { return residual.empty() ? -1 : residual[i]; }

  int64_t depth() const { return static_cast<int64_t>(weights.size()); }
  int64_t width(int64_t i) const { return i == 0 ? weights[0].size(1) : weights[i - 1].size(0); }
  int64_t rows() const { return 1 + columns + (laplacian ? 1 : 0); }
  int64_t delta_row() const { return 1 + columns; }
  bool has_d(int64_t i) const { return has_derivative(activations[i]); }
  bool has_d2(int64_t i) const { return has_curvature(activations[i]); }
  bool has_d3(int64_t i) const { return laplacian && has_d2(i); }
  // The backward reads a layer's P and q only through act'' and act'''.
  bool saves_pre(int64_t i) const { return i < carried && rows() > 1 && has_d2(i); }

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return Kernels::empty(sizes, options);
  }
  Tensor& zeroed(Tensor& acc, at::IntArrayRef sizes, const at::TensorOptions& options) const {
    if (!acc.defined()) acc = empty(sizes, options).zero_();
    return acc;
  }
  // acc += a b (acc allocated by the first product).
  void add_mm(Tensor& acc, const Tensor& a, const Tensor& b) const {
    if (acc.defined()) {
      acc.addmm_(a, b);
    } else {
      acc = empty({a.size(0), b.size(1)}, a.options());
      Kernels::mm(acc, a, b);
    }
  }

  CarrySaved allocate_saved(int64_t B, int64_t extra_width, const at::TensorOptions& options) const {
    CarrySaved s;
    for (const auto i : c10::irange(depth())) {
      const int64_t n = width(i + 1);
      s.d1.push_back(has_d(i) ? empty({B, n}, options) : Tensor());
      s.d2.push_back(has_d2(i) ? empty({B, n}, options) : Tensor());
      s.d3.push_back(has_d3(i) ? empty({B, n}, options) : Tensor());
      if (i > 0) s.hidden.push_back(empty({B, rows(), width(i)}, options));
      s.pre.push_back(saves_pre(i) ? empty({B, rows(), n}, options) : Tensor());
    }
    if (extra_width > 0) s.extra = empty({B, extra_width}, options);
    return s;
  }
  static std::vector<Tensor> pack_saved(const CarrySaved& s, const at::TensorOptions& options) {
    std::vector<Tensor> saved;
    for (const auto* list : {&s.d1, &s.d2, &s.d3, &s.hidden, &s.pre}) {
      for (const Tensor& t : *list) saved.push_back(undefined_to_absent(t, options));
    }
    saved.push_back(undefined_to_absent(s.extra, options));
    return saved;
  }
  CarrySaved unpack_saved(at::TensorList saved) const {
    const int64_t L = depth(), expected = 5 * L;
    TORCH_CHECK(static_cast<int64_t>(saved.size()) == expected, "jacext: expected ", expected,
                " saved tensors, got ", saved.size());
    CarrySaved s;
    for (const auto i : c10::irange(L)) {
      s.d1.push_back(absent_to_undefined(saved[i]));
      s.d2.push_back(absent_to_undefined(saved[L + i]));
      s.d3.push_back(absent_to_undefined(saved[2 * L + i]));
      s.pre.push_back(absent_to_undefined(saved[4 * L - 1 + i]));
      TORCH_CHECK(s.d1[i].defined() == has_d(i) && s.d2[i].defined() == has_d2(i) &&
                      s.d3[i].defined() == has_d3(i) && s.pre[i].defined() == saves_pre(i),
                  "jacext: the saved tensors of layer ", i, " do not match its activation and the op's plan");
    }
    s.hidden.assign(saved.begin() + 3 * L, saved.begin() + 4 * L - 1);
    s.extra = absent_to_undefined(saved[5 * L - 1]);
    return s;
  }

  // One tile's view of the saved tensors.
  struct Tile {
    int64_t n;
    std::vector<Tensor> d1, d2, d3, hidden, pre;
    Tensor extra, v;
    std::vector<Tensor> shift, gate, mask;
    // the backward's outputs for the tile's samples: sbar and gbar per layer (undefined: none)
    std::vector<Tensor> shift_bar, gate_bar;
  };
  Tile tile_of(const CarrySaved& s, int64_t b0, int64_t n) const {
    Tile t{n, batch_rows(s.d1, b0, n), batch_rows(s.d2, b0, n), batch_rows(s.d3, b0, n),
           batch_rows(s.hidden, b0, n), batch_rows(s.pre, b0, n)};
    if (s.extra.defined()) t.extra = s.extra.narrow(0, b0, n);
    if (projections.defined()) t.v = projections.narrow(0, b0, n);
    t.shift = batch_rows(sample_biases, b0, n);
    t.gate = batch_rows(gates, b0, n);
    t.mask = batch_rows(masks, b0, n);
    return t;
  }

  // C_0 for a tile: [x; I or V; 0] (n, rows, n_0), I the first c unit vectors; with h alone, x
  // itself. Formed, so that the first layer is a GEMM like the others (c + 2 short rows: a small
  // share of its work).
  Tensor first_carry(const Tensor& x, const Tensor& v) const {
    const int64_t n = x.size(0), n0 = x.size(1);
    if (rows() == 1) return x.view({n, 1, n0});
    Tensor c0 = empty({n, rows(), n0}, x.options());
    c0.select(1, 0).copy_(x);
    Tensor tangents = c0.narrow(1, 1, columns);
    if (v.defined()) {
      tangents.copy_(v);
    } else {
      tangents.zero_();
      tangents.diagonal(0, 1, 2).fill_(1);
    }
    if (laplacian) c0.select(1, delta_row()).zero_();
    return c0;
  }
  // The input carry of layer i for a tile.
  Tensor carry_into(int64_t i, const Tile& t, const Tensor& x) const {
    return i == 0 ? first_carry(x, t.v) : t.hidden[i - 1];
  }

  // Layer i over a tile: A = in W[i]^T (in: the stacked rows as a matrix), then the fused pass into
  // out (n, R, n_{i+1}); A is the saved pre-activation, or out itself (the pass runs in place).
  // R = 1 with rows() > 1 is the h row alone (the layers above `carried`).
  void layer_forward(int64_t i, const Tensor& in, const Tensor& out, const Tile& t) const {
    const bool full = out.size(1) == rows();
    Tensor a = full && t.pre[i].defined() ? t.pre[i] : out;
    Kernels::mm(flat(a), in, weights[i].t());
    if (t.gate[i].defined()) a.mul_(t.gate[i].unsqueeze(1));
    if (t.shift[i].defined()) a.select(1, 0).add_(t.shift[i]);
    Kernels::carry_forward(a, bias_at(biases, i).value_or(Tensor()), out, t.d1[i], t.d2[i],
                           full ? t.d3[i] : Tensor(), activations[i], act_params[2 * i], act_params[2 * i + 1],
                           full ? columns : 0, full && laplacian, squared);
    if (t.mask[i].defined()) out.mul_(t.mask[i].unsqueeze(1));
  }

  // The carried layers of a tile; returns C_carried (for carried = 0, C_0). `top` receives the
  // output of layer L-1 when every layer is carried (a tile temporary otherwise).
  Tensor carry_forward(const Tile& t, const Tensor& x, const Tensor& top) const {
    const Tensor c0 = first_carry(x, t.v);
    Tensor c = c0;
    for (const auto i : c10::irange(carried)) {
      Tensor out = i + 1 < depth() ? t.hidden[i] : top;
      layer_forward(i, flat(c), out, t);
      if (const int64_t j = skip(i); j >= 0) out.add_(j == 0 ? c0 : t.hidden[j - 1]);
      c = out;
    }
    return c;
  }

  // Layer i's backward over a tile: g (n, R', n_{i+1}) holds the adjoint of its output and becomes
  // that of A; adds the weight and bias gradients (in: the layer's stacked input rows as a matrix)
  // and returns the adjoint of the input carry when asked (`input`), else an undefined tensor.
  Tensor layer_backward(int64_t i, const Tensor& g, const Tensor& in, const Tile& t, const Tensor& adj_d,
                        bool zero_tangents, bool input, CarrySums& sums) const {
    const bool full = g.size(1) == rows();
    // the adjoint of the unmasked rows (zero_tangents: the T rows are never read, scaled or not)
    if (t.mask[i].defined()) g.mul_(t.mask[i].unsqueeze(1));
    Kernels::carry_backward(g, full ? t.pre[i] : Tensor(), t.d1[i], t.d2[i], full ? t.d3[i] : Tensor(), adj_d,
                            full ? columns : 0, full && laplacian, squared, zero_tangents);
    const auto options = g.options();
    if (bias_at(biases, i)) zeroed(sums.b[i], {width(i + 1)}, options).add_(g.select(1, 0).sum(0));
    if (t.shift_bar[i].defined()) t.shift_bar[i].copy_(g.select(1, 0));
    if (t.gate[i].defined()) {  // g holds the adjoint of the scaled rows g_i .* A
      Tensor a = empty(g.sizes(), options);
      Kernels::mm(flat(a), in, weights[i].t());
      Tensor gate_bar = t.gate_bar[i];
      at::sum_out(gate_bar, a.mul_(g), 1);
      g.mul_(t.gate[i].unsqueeze(1));
    }
    add_mm(sums.w[i], flat(g).t(), in);
    if (!input) return Tensor();
    Tensor g_in = empty({g.size(0), g.size(1), width(i)}, options);
    Kernels::mm(flat(g_in), flat(g), weights[i]);
    return g_in;
  }

  // The sweep down from layer `top` (g: the adjoint of its output) to the input; adj_d: per layer,
  // an epilogue's adjoint of act' (or undefined). zero_tangents: g's T rows are zero (unwritten).
  // A skip C_{i+1} = f_i(C_i) + C_j passes the adjoint of C_{i+1} to C_j too: pending[j] holds it
  // until the sweep has C_j's adjoint from layer j's backward (j = 0: x's row of C_0).
  void sweep_backward(Tensor g, int64_t top, const Tile& t, const Tensor& x, const std::vector<Tensor>& adj_d,
                      bool zero_tangents, const Tensor& grad_x, CarrySums& sums) const {
    std::vector<Tensor> pending(residual.empty() ? 0 : top + 2);
    for (int64_t i = top; i >= 0; --i) {
      if (!pending.empty() && pending[i + 1].defined()) g.add_(pending[i + 1]);
      if (const int64_t j = skip(i); j >= 0) {
        if (zero_tangents && i == top) g.narrow(1, 1, columns).zero_();  // unwritten T rows, copied below
        if (pending[j].defined()) {
          pending[j].add_(g);
        } else {
          pending[j] = empty(g.sizes(), g.options()).copy_(g);
        }
      }
      Tensor g_in = layer_backward(i, g, flat(carry_into(i, t, x)), t, adj_d[i], zero_tangents && i == top,
                                   i > 0, sums);
      // of C_0 = [x; I or V; 0] only x's row has a gradient (V is held constant)
      if (i == 0 && grad_x.defined()) Kernels::mm(grad_x, g.select(1, 0), weights[0]);
      g = g_in;
    }
    if (top < 0 && grad_x.defined()) grad_x.copy_(g.select(1, 0));  // no carried layer: g is C_0's adjoint
    if (!pending.empty() && pending[0].defined() && grad_x.defined()) grad_x.add_(pending[0].select(1, 0));
  }

  // Adds the weight gradients of the slots' sums (empty layers: zeros).
  std::tuple<std::vector<Tensor>, std::vector<Tensor>> totals(std::vector<CarrySums>& sums,
                                                              const at::TensorOptions& options) const {
    std::vector<Tensor> grad_w(depth()), grad_b(depth());
    for (const auto i : c10::irange(depth())) {
      grad_w[i] = total(sums, &CarrySums::w, i, weights[i].sizes(), options);
      grad_b[i] = bias_at(biases, i) ? total(sums, &CarrySums::b, i, {width(i + 1)}, options)
                                     : at::empty({0}, options);
    }
    return {grad_w, grad_b};
  }
  Tensor total(std::vector<CarrySums>& sums, std::vector<Tensor> CarrySums::*member, int64_t i,
               at::IntArrayRef sizes, const at::TensorOptions& options) const {
    Tensor out;
    for (CarrySums& s : sums) {
      const Tensor& part = (s.*member)[i];
      if (!part.defined()) continue;
      if (out.defined()) {
        out.add_(part);
      } else {
        out = part;
      }
    }
    return out.defined() ? out : empty(sizes, options).zero_();
  }
};

// act' of a tile's layer, or ones for an identity layer (the closed forms multiply by it).
inline Tensor derivative_or_ones(const Tensor& d, int64_t n, int64_t width, const at::TensorOptions& options) {
  return d.defined() ? d : at::ones({n, width}, options);
}

// Rows of `out` (n, w) = src, or zeros without one.
inline void copy_or_zero(const Tensor& out, const Tensor& src) {
  if (src.defined()) {
    out.copy_(src);
  } else {
    out.zero_();
  }
}

inline Tensor value_or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// Sets the net's per-sample biases, gates and dropout masks; whether any layer has one of them.
template <class Net>
bool condition(Net& net, const std::optional<at::TensorList>& sample_biases,
               const std::optional<at::TensorList>& gates, const std::optional<at::TensorList>& masks,
               const Tensor& x, at::TensorList weights) {
  net.sample_biases = checked_conditioning(sample_biases, x, weights, "sample_biases");
  net.gates = checked_conditioning(gates, x, weights, "gates");
  net.masks = checked_conditioning(masks, x, weights, "masks");
  for (const auto i : c10::irange(net.depth())) {
    if (net.sample_biases[i].defined() || net.gates[i].defined() || net.masks[i].defined()) return true;
  }
  return false;
}

// Whether the last layer has a per-sample bias, gate or mask (it keeps every row through it then).
inline bool per_sample_top(const std::optional<at::TensorList>& sample_biases,
                           const std::optional<at::TensorList>& gates, const std::optional<at::TensorList>& masks) {
  for (const auto* list : {&sample_biases, &gates, &masks}) {
    if (list->has_value() && !(*list)->empty()) {
      const Tensor& top = (*list)->back();
      if (top.defined() && !(top.numel() == 0 && top.dim() == 1)) return true;
    }
  }
  return false;
}

// The backward's per-sample outputs, sbar or gbar per layer: (B, n_{i+1}) where the net has a bias
// or gate there (every tile writes its rows), undefined elsewhere.
inline std::vector<Tensor> conditioning_grads(const std::vector<Tensor>& given, const at::TensorOptions& options) {
  std::vector<Tensor> out;
  for (const Tensor& s : given) out.push_back(s.defined() ? at::empty(s.sizes(), options) : Tensor());
  return out;
}

// The backward ops' results: grad_x, the weight and bias gradients, then sbar and gbar per layer
// (an empty tensor for a layer without).
using CarryGrads = std::tuple<std::optional<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                              std::vector<Tensor>>;
inline std::vector<Tensor> absent_where_undefined(const std::vector<Tensor>& all, const at::TensorOptions& options) {
  std::vector<Tensor> out;
  for (const Tensor& t : all) out.push_back(undefined_to_absent(t, options));
  return out;
}

// ---------------------------------------------------------------------------------------------
// The Laplacian: y, J V^T (when `gradient`) and Delta y = sum_{j<k} v_j^T (d^2 y / dx^2) v_j, all
// (B, m, ...), for c tangent rows v_j: the unit vectors (c = n_0; J and the Laplacian
// sum_j d^2 y / dx_j^2 when k = n_0), or the caller's `directions` (B or 1, c, n_0); k =
// laplacian_rows (-1: all c).

// The directions, checked and expanded to the batch (a broadcast row stays stride-0: only copied
// into C_0), or undefined.
inline Tensor checked_directions(const std::optional<Tensor>& directions, const Tensor& x) {
  if (!directions.has_value() || !directions->defined()) return Tensor();
  const Tensor& v = *directions;
  const int64_t B = x.size(0);
  TORCH_CHECK(v.dim() == 3 && (v.size(0) == B || v.size(0) == 1) && v.size(1) >= 1 && v.size(2) == x.size(1),
              "jacext: directions must have shape (batch=", B, " or 1, c >= 1, features=", x.size(1), "), got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device(),
              "jacext: directions must match x's dtype and device, got ", v.scalar_type(), " on ", v.device());
  return v.expand({B, v.size(1), v.size(2)});
}

// The plan of the Laplacian op and of its backward (both start here, after the input checks).
// Without the gradient only the first k rows reach an output: the others are not carried.
template <class Kernels>
ForwardCarry<Kernels> laplacian_carry(const Tensor& x, at::TensorList weights, at::TensorList biases,
                                      at::IntArrayRef activations, at::ArrayRef<double> act_params,
                                      bool gradient, const std::optional<Tensor>& directions,
                                      int64_t laplacian_rows, int64_t tile, at::OptionalIntArrayRef residual,
                                      const std::optional<at::TensorList>& sample_biases,
                                      const std::optional<at::TensorList>& gates,
                                      const std::optional<at::TensorList>& masks) {
  check_mlp(x, weights, biases, activations, act_params, 0, kReverse);
  check_tile(tile);
  std::vector<int64_t> skips = checked_residual(residual, weights);
  Tensor v = checked_directions(directions, x);
  const int64_t L = static_cast<int64_t>(weights.size()), c = v.defined() ? v.size(1) : x.size(1);
  TORCH_CHECK(laplacian_rows == -1 || (laplacian_rows >= 1 && laplacian_rows <= c), "jacext: laplacian_rows must "
              "be -1 (every tangent row) or in [1, ", c, "], got ", laplacian_rows);
  const int64_t k = laplacian_rows == -1 ? c : laplacian_rows, columns = gradient ? c : k;
  if (v.defined() && columns < c) v = v.narrow(1, 0, columns);
  // A linear output layer maps h and Delta alone when J is not returned (and no skip ends there, no
  // per-sample bias, gate or mask is on it).
  const bool thin_top = !gradient && activations[L - 1] == kIdentity && (skips.empty() || skips[L - 1] < 0) &&
                        !per_sample_top(sample_biases, gates, masks);
  ForwardCarry<Kernels> net{weights, biases, activations, act_params, columns, true, thin_top ? L - 1 : L, v, k,
                            std::move(skips)};
  condition(net, sample_biases, gates, masks, x, weights);
  return net;
}

template <class Kernels>
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> mlp_laplacian(
    const Tensor& x_in, at::TensorList weights, at::TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, bool gradient, const std::optional<Tensor>& directions,
    int64_t laplacian_rows, const std::optional<at::TensorList>& sample_biases,
    const std::optional<at::TensorList>& gates, const std::optional<at::TensorList>& masks, int64_t tile,
    at::OptionalIntArrayRef residual) {
  const Tensor x = x_in.contiguous();
  const auto net = laplacian_carry<Kernels>(x, weights, biases, activations, act_params, gradient, directions,
                                            laplacian_rows, tile, residual, sample_biases, gates, masks);
  const int64_t B = x.size(0), L = net.depth(), m = net.width(L), c = net.columns;
  const auto options = x.options();
  Tensor y = net.empty({B, m}, options), lap = net.empty({B, m}, options);
  Tensor grad = gradient ? net.empty({B, m, c}, options) : at::empty({0}, options);
  const CarrySaved saved = net.allocate_saved(B, 0, options);
  Kernels::for_tiles(B, tile, [&](int64_t /*slot*/, int64_t b0, int64_t n) {
    const auto t = net.tile_of(saved, b0, n);
    Tensor y_t = y.narrow(0, b0, n), lap_t = lap.narrow(0, b0, n);
    if (net.carried == L) {
      Tensor top = net.empty({n, net.rows(), m}, options);
      net.carry_forward(t, x.narrow(0, b0, n), top);
      y_t.copy_(top.select(1, 0));
      lap_t.copy_(top.select(1, net.delta_row()));
      if (gradient) grad.narrow(0, b0, n).copy_(top.narrow(1, 1, c).transpose(1, 2));
      return;
    }
    Tensor c = net.carry_forward(t, x.narrow(0, b0, n), Tensor());  // C_{L-1}
    const Tensor& w = weights[L - 1];
    if (auto b = bias_at(biases, L - 1)) {
      Kernels::addmm(y_t, *b, c.select(1, 0), w.t());
    } else {
      Kernels::mm(y_t, c.select(1, 0), w.t());
    }
    Kernels::mm(lap_t, c.select(1, net.delta_row()), w.t());
  });
  return {y, grad, lap, net.pack_saved(saved, options)};
}

// Gradients of sum(grad_y * y) + sum(grad_grad * grad) + sum(grad_lap * Delta y) w.r.t. x (when
// input_grad), the weights and the biases (an empty tensor for a layer without bias); the
// directions are held constant.
template <class Kernels>
CarryGrads mlp_laplacian_backward(
    const std::optional<Tensor>& grad_y_in, const std::optional<Tensor>& grad_grad_in,
    const std::optional<Tensor>& grad_lap_in, const Tensor& x_in, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef activations, at::ArrayRef<double> act_params, bool gradient, at::TensorList saved_list,
    const std::optional<Tensor>& directions, int64_t laplacian_rows,
    const std::optional<at::TensorList>& sample_biases, const std::optional<at::TensorList>& gates,
    const std::optional<at::TensorList>& masks, int64_t tile, bool input_grad, at::OptionalIntArrayRef residual) {
  const Tensor x = x_in.contiguous();
  const auto net = laplacian_carry<Kernels>(x, weights, biases, activations, act_params, gradient, directions,
                                            laplacian_rows, tile, residual, sample_biases, gates, masks);
  const int64_t B = x.size(0), L = net.depth(), m = net.width(L), c = net.columns;
  const auto options = x.options();
  const CarrySaved saved = net.unpack_saved(saved_list);
  const Tensor grad_y = value_or_undefined(grad_y_in), grad_grad = value_or_undefined(grad_grad_in),
               grad_lap = value_or_undefined(grad_lap_in);
  TORCH_CHECK(!grad_grad.defined() || gradient, "jacext: the gradient was not returned (gradient=False), so it "
              "takes no incoming gradient");
  for (const auto& [g, name, sizes] : {std::tuple<Tensor, const char*, std::vector<int64_t>>{grad_y, "grad_y", {B, m}},
                                       {grad_grad, "grad_grad", {B, m, c}}, {grad_lap, "grad_lap", {B, m}}}) {
    TORCH_CHECK(!g.defined() || g.sizes() == at::IntArrayRef(sizes), "jacext: ", name, " must have shape ",
                at::IntArrayRef(sizes), ", got ", g.sizes());
  }
  Tensor grad_x = input_grad ? net.empty(x.sizes(), options) : Tensor();
  const std::vector<Tensor> shift_bar = conditioning_grads(net.sample_biases, options),
                            gate_bar = conditioning_grads(net.gates, options);
  std::vector<CarrySums> sums(Kernels::sum_slots(B, tile), CarrySums(L));
  const std::vector<Tensor> no_adj_d(L);
  Kernels::for_tiles(B, tile, [&](int64_t slot, int64_t b0, int64_t n) {
    auto t = net.tile_of(saved, b0, n);
    t.shift_bar = batch_rows(shift_bar, b0, n);
    t.gate_bar = batch_rows(gate_bar, b0, n);
    const Tensor x_t = x.narrow(0, b0, n), gx = input_grad ? grad_x.narrow(0, b0, n) : Tensor();
    const Tensor gy = grad_y.defined() ? grad_y.narrow(0, b0, n) : Tensor();
    const Tensor gl = grad_lap.defined() ? grad_lap.narrow(0, b0, n) : Tensor();
    CarrySums& s = sums[slot];
    if (net.carried == L) {
      Tensor g = net.empty({n, net.rows(), m}, options);
      copy_or_zero(g.select(1, 0), gy);
      copy_or_zero(g.narrow(1, 1, c), grad_grad.defined() ? grad_grad.narrow(0, b0, n).transpose(1, 2) : Tensor());
      copy_or_zero(g.select(1, net.delta_row()), gl);
      net.sweep_backward(g, L - 1, t, x_t, no_adj_d, false, gx, s);
      return;
    }
    // The thin last layer: y = h W^T + b, Delta y = Delta W^T; the T rows get no adjoint.
    const Tensor c = net.carry_into(L - 1, t, x_t);
    const Tensor& w = weights[L - 1];
    Tensor g = net.empty({n, net.rows(), net.width(L - 1)}, options);
    for (const auto& [row, grad] : {std::pair<int64_t, Tensor>{0, gy}, {net.delta_row(), gl}}) {
      if (!grad.defined()) {
        g.select(1, row).zero_();
        continue;
      }
      net.add_mm(s.w[L - 1], grad.t(), c.select(1, row));
      Kernels::mm(g.select(1, row), grad, w);
    }
    if (gy.defined() && bias_at(biases, L - 1)) net.zeroed(s.b[L - 1], {m}, options).add_(gy.sum(0));
    net.sweep_backward(g, L - 2, t, x_t, no_adj_d, true, gx, s);
  });
  auto [grad_w, grad_b] = net.totals(sums, options);
  return {input_grad ? std::optional<Tensor>(grad_x) : std::nullopt, grad_w, grad_b,
          absent_where_undefined(shift_bar, options), absent_where_undefined(gate_bar, options)};
}

// ---------------------------------------------------------------------------------------------
// The Jacobian diagonal of a square net (B, n), its trace (kTraceGram2: (B)), or with projections
// V (B, k, n) the k terms v_j^T J v_j (B, k).

inline void check_diagonal(const Tensor& x, at::TensorList weights, at::IntArrayRef activations,
                           int64_t strategy, bool skips, bool per_sample) {
  const int64_t L = static_cast<int64_t>(weights.size()), n0 = x.size(1), m = weights[L - 1].size(0);
  TORCH_CHECK(m == n0, "jacext: the Jacobian diagonal and the divergence need a square net (as many outputs "
              "as inputs), got ", n0, " inputs and ", m, " outputs");
  TORCH_CHECK(strategy >= kForward && strategy <= kTraceGram2, "jacext: strategy must be 0 (forward columns), "
              "1 (one-hidden-layer closed form) or 2 (two-hidden-layer trace), got ", strategy);
  TORCH_CHECK(strategy != kGram1 || L == 2, "jacext: strategy 1 (one-hidden-layer closed form) needs exactly "
              "two layers, got ", L);
  TORCH_CHECK(strategy != kTraceGram2 || (L == 3 && activations[2] == kIdentity), "jacext: strategy 2 "
              "(two-hidden-layer trace) needs exactly three layers and a linear output layer");
  TORCH_CHECK(strategy == kForward || !skips, "jacext: the closed forms (strategy ", strategy, ") do not apply "
              "across a residual skip; strategy must be 0 (forward columns)");
  TORCH_CHECK(strategy == kForward || !per_sample, "jacext: the closed forms (strategy ", strategy, ") do not "
              "apply with per-sample biases, gates or dropout masks; strategy must be 0 (forward columns)");
}

inline Tensor checked_tangents(const std::optional<Tensor>& projections, const Tensor& x, int64_t strategy) {
  if (!projections.has_value() || !projections->defined()) return Tensor();
  const Tensor& v = *projections;
  TORCH_CHECK(v.dim() == 3 && v.size(0) == x.size(0) && v.size(2) == x.size(1) && v.size(1) >= 1,
              "jacext: projections must have shape (batch=", x.size(0), ", k >= 1, features=", x.size(1),
              "), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device(),
              "jacext: projections must match x's dtype and device, got ", v.scalar_type(), " on ", v.device());
  TORCH_CHECK(strategy == kForward, "jacext: projections are carried forward; strategy must be 0, got ", strategy);
  return v.contiguous();
}

// The plan of a diagonal op and of its backward (both start here, after the input checks); the
// checked projections are net.projections. kForward carries every layer (reads its output off the
// top carry) with projections or a skip into the last layer, else stops one layer early.
template <class Kernels>
ForwardCarry<Kernels> diagonal_carry(const Tensor& x, at::TensorList weights, at::TensorList biases,
                                     at::IntArrayRef activations, at::ArrayRef<double> act_params,
                                     int64_t strategy, const std::optional<Tensor>& projections, int64_t tile,
                                     at::OptionalIntArrayRef residual,
                                     const std::optional<at::TensorList>& sample_biases,
                                     const std::optional<at::TensorList>& gates,
                                     const std::optional<at::TensorList>& masks) {
  check_mlp(x, weights, biases, activations, act_params, 0, kReverse);
  check_tile(tile);
  std::vector<int64_t> skips = checked_residual(residual, weights);
  const int64_t L = static_cast<int64_t>(weights.size());
  ForwardCarry<Kernels> net{weights, biases, activations, act_params, 0, false, L, Tensor()};
  const bool per_sample = condition(net, sample_biases, gates, masks, x, weights);
  check_diagonal(x, weights, activations, strategy, !skips.empty(), per_sample);
  const Tensor v = checked_tangents(projections, x, strategy);
  if (strategy != kForward) return net;
  const bool full_top =
      v.defined() || (!skips.empty() && skips[L - 1] >= 0) || per_sample_top(sample_biases, gates, masks);
  net.columns = v.defined() ? v.size(1) : x.size(1);
  net.carried = full_top ? L : L - 1;
  net.projections = v;
  net.residual = std::move(skips);
  return net;
}

// The closed forms' sample-independent matrices: kGram1 M = W_1 .* W_2^T (n_1 x n_0); kTraceGram2
// C = W_1 W_3 (n_1 x n_2) and M = W_2 .* C^T (n_2 x n_1).
struct ClosedForm {
  Tensor m, c;
};
inline ClosedForm closed_form(at::TensorList weights, int64_t strategy) {
  if (strategy == kGram1) return {weights[0] * weights[1].t(), Tensor()};
  if (strategy == kTraceGram2) {
    Tensor c = at::mm(weights[0], weights[2]);
    return {weights[1] * c.t(), c};
  }
  return {};
}

// e[b, i] = sum_k W[i, k] T_i[b, k] for the carry c = [h; T] (n, 1 + n, N): one batched row-dot.
inline Tensor row_dots(const Tensor& c, const Tensor& w) {
  const int64_t n0 = w.size(0);
  return at::bmm(c.narrow(1, 1, n0).transpose(0, 1), w.unsqueeze(2)).squeeze(2).t();
}

template <class Kernels>
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_jacobian_diagonal(
    const Tensor& x_in, at::TensorList weights, at::TensorList biases, at::IntArrayRef activations,
    at::ArrayRef<double> act_params, int64_t strategy, const std::optional<Tensor>& projections,
    const std::optional<at::TensorList>& sample_biases, const std::optional<at::TensorList>& gates,
    const std::optional<at::TensorList>& masks, int64_t tile, at::OptionalIntArrayRef residual) {
  const Tensor x = x_in.contiguous();
  const auto net = diagonal_carry<Kernels>(x, weights, biases, activations, act_params, strategy, projections, tile,
                                           residual, sample_biases, gates, masks);
  const Tensor& v = net.projections;
  const int64_t B = x.size(0), L = net.depth(), n0 = x.size(1);
  const bool full_top = strategy == kForward && net.carried == L;
  const auto options = x.options();
  Tensor y = net.empty({B, n0}, options);
  Tensor out = strategy == kTraceGram2 ? net.empty({B}, options)
                                       : net.empty({B, v.defined() ? v.size(1) : n0}, options);
  const int64_t extra = strategy == kTraceGram2 ? net.width(2) : full_top ? 0 : n0;
  const CarrySaved saved = net.allocate_saved(B, extra, options);
  const ClosedForm closed = closed_form(weights, strategy);
  Kernels::for_tiles(B, tile, [&](int64_t /*slot*/, int64_t b0, int64_t n) {
    const auto t = net.tile_of(saved, b0, n);
    const Tensor x_t = x.narrow(0, b0, n), y_t = y.narrow(0, b0, n);
    Tensor out_t = out.narrow(0, b0, n);
    if (full_top) {  // v_j^T J v_j = v_j . T_j at the output; without projections, T_jj
      Tensor top = net.empty({n, net.rows(), n0}, options);
      net.carry_forward(t, x_t, top);
      y_t.copy_(top.select(1, 0));
      const Tensor tangents = top.narrow(1, 1, net.columns);
      if (v.defined()) {
        at::sum_out(out_t, tangents * t.v, 2);
      } else {
        out_t.copy_(tangents.diagonal(0, 1, 2));
      }
    } else if (strategy == kForward) {  // C_{L-1}, the last layer on the h row, the row-dots
      Tensor c = net.carry_forward(t, x_t, Tensor());
      net.layer_forward(L - 1, c.select(1, 0), y_t.view({n, 1, n0}), t);
      t.extra.copy_(row_dots(c, weights[L - 1]));
      out_t.copy_(t.d1[L - 1].defined() ? t.extra * t.d1[L - 1] : t.extra);
    } else {  // the MLP forward, then d_1 M (kGram1) or d_1 M^T (kTraceGram2)
      net.carry_forward(t, x_t, y_t.view({n, 1, n0}));
      const Tensor d_first = derivative_or_ones(t.d1[0], n, net.width(1), options);
      Kernels::mm(t.extra, d_first, strategy == kGram1 ? closed.m : closed.m.t());
      if (strategy == kGram1) {
        out_t.copy_(t.d1[1].defined() ? t.extra * t.d1[1] : t.extra);
      } else {
        at::sum_out(out_t, t.extra * derivative_or_ones(t.d1[1], n, net.width(2), options), 1);
      }
    }
  });
  return {y, out, net.pack_saved(saved, options)};
}

// Gradients of sum(grad_y * y) + sum(grad_out * out) w.r.t. x (when input_grad), the weights and
// the biases; the projections are held constant.
template <class Kernels>
CarryGrads mlp_jacobian_diagonal_backward(
    const std::optional<Tensor>& grad_y_in, const std::optional<Tensor>& grad_out_in, const Tensor& x_in,
    at::TensorList weights, at::TensorList biases, at::IntArrayRef activations, at::ArrayRef<double> act_params,
    int64_t strategy, at::TensorList saved_list, const std::optional<Tensor>& projections,
    const std::optional<at::TensorList>& sample_biases, const std::optional<at::TensorList>& gates,
    const std::optional<at::TensorList>& masks, int64_t tile, bool input_grad, at::OptionalIntArrayRef residual) {
  const Tensor x = x_in.contiguous();
  const auto net = diagonal_carry<Kernels>(x, weights, biases, activations, act_params, strategy, projections, tile,
                                           residual, sample_biases, gates, masks);
  const Tensor& v = net.projections;
  const int64_t B = x.size(0), L = net.depth(), n0 = x.size(1);
  const bool full_top = strategy == kForward && net.carried == L;
  const auto options = x.options();
  const CarrySaved saved = net.unpack_saved(saved_list);
  const Tensor grad_y = value_or_undefined(grad_y_in), grad_out = value_or_undefined(grad_out_in);
  TORCH_CHECK(!grad_y.defined() || grad_y.sizes() == at::IntArrayRef({B, n0}), "jacext: grad_y must have shape ",
              at::IntArrayRef({B, n0}), ", got ", grad_y.sizes());
  const std::vector<int64_t> out_sizes = strategy == kTraceGram2 ? std::vector<int64_t>{B}
                                         : std::vector<int64_t>{B, v.defined() ? v.size(1) : n0};
  TORCH_CHECK(!grad_out.defined() || grad_out.sizes() == at::IntArrayRef(out_sizes), "jacext: grad_out must have "
              "shape ", at::IntArrayRef(out_sizes), ", got ", grad_out.sizes());
  const ClosedForm closed = closed_form(weights, strategy);
  Tensor grad_x = input_grad ? net.empty(x.sizes(), options) : Tensor();
  const std::vector<Tensor> shift_bar = conditioning_grads(net.sample_biases, options),
                            gate_bar = conditioning_grads(net.gates, options);
  std::vector<CarrySums> sums(Kernels::sum_slots(B, tile), CarrySums(L));
  Kernels::for_tiles(B, tile, [&](int64_t slot, int64_t b0, int64_t n) {
    auto t = net.tile_of(saved, b0, n);
    t.shift_bar = batch_rows(shift_bar, b0, n);
    t.gate_bar = batch_rows(gate_bar, b0, n);
    const Tensor x_t = x.narrow(0, b0, n), gx = input_grad ? grad_x.narrow(0, b0, n) : Tensor();
    const Tensor gy = grad_y.defined() ? grad_y.narrow(0, b0, n) : Tensor();
    const Tensor go = grad_out.defined() ? grad_out.narrow(0, b0, n) : Tensor();
    CarrySums& s = sums[slot];
    std::vector<Tensor> adj_d(L);
    if (full_top) {  // T_j's adjoint: grad_out_j v_j, or grad_out_j e_j without projections
      Tensor g = net.empty({n, net.rows(), n0}, options);
      copy_or_zero(g.select(1, 0), gy);
      const Tensor tangents_bar = !go.defined() ? Tensor() : v.defined() ? go.unsqueeze(2) * t.v : at::diag_embed(go);
      copy_or_zero(g.narrow(1, 1, net.columns), tangents_bar);
      net.sweep_backward(g, L - 1, t, x_t, adj_d, false, gx, s);
      return;
    }
    if (strategy == kForward) {
      // diag = d_L .* e: e's adjoint ebar = grad_out .* d_L, d_L's = grad_out .* e; then
      // T_i's adjoint is ebar_i W[L-1][i, :], and W[L-1][i, :] gets sum_b ebar_i T_i.
      const Tensor c = net.carry_into(L - 1, t, x_t);
      Tensor g_top = net.empty({n, 1, n0}, options);
      copy_or_zero(g_top.select(1, 0), gy);
      Tensor ebar;
      if (go.defined()) {
        ebar = t.d1[L - 1].defined() ? go * t.d1[L - 1] : go;
        if (net.has_d2(L - 1)) adj_d[L - 1] = go * t.extra;
      }
      net.layer_backward(L - 1, g_top, c.select(1, 0), t, adj_d[L - 1], false, false, s);
      Tensor g = net.empty({n, net.rows(), net.width(L - 1)}, options);
      Kernels::mm(g.select(1, 0), g_top.select(1, 0), weights[L - 1]);
      Tensor tangents = g.narrow(1, 1, n0);
      if (ebar.defined()) {
        at::mul_out(tangents, ebar.unsqueeze(2), weights[L - 1].unsqueeze(0));
        s.w[L - 1].add_(at::bmm(ebar.t().unsqueeze(1), c.narrow(1, 1, n0).transpose(0, 1)).squeeze(1));
      } else {
        tangents.zero_();
      }
      net.sweep_backward(g, L - 2, t, x_t, adj_d, false, gx, s);
      return;
    }
    Tensor g = net.empty({n, 1, n0}, options);
    copy_or_zero(g.select(1, 0), gy);
    if (go.defined()) {
      const Tensor d_first = derivative_or_ones(t.d1[0], n, net.width(1), options);
      if (strategy == kGram1) {  // diag = d_2 .* (d_1 M)
        const Tensor ebar = t.d1[1].defined() ? go * t.d1[1] : go;
        if (net.has_d2(1)) adj_d[1] = go * t.extra;
        if (net.has_d2(0)) adj_d[0] = at::mm(ebar, closed.m.t());
        net.add_mm(s.m, d_first.t(), ebar);
      } else {  // trace = d_2 . (d_1 M^T)
        const Tensor ubar = go.unsqueeze(1) * derivative_or_ones(t.d1[1], n, net.width(2), options);
        if (net.has_d2(1)) adj_d[1] = go.unsqueeze(1) * t.extra;
        if (net.has_d2(0)) adj_d[0] = at::mm(ubar, closed.m);
        net.add_mm(s.m, ubar.t(), d_first);
      }
    }
    net.sweep_backward(g, L - 1, t, x_t, adj_d, false, gx, s);
  });
  auto [grad_w, grad_b] = net.totals(sums, options);
  Tensor dm;
  for (CarrySums& s : sums) {
    if (s.m.defined()) dm = dm.defined() ? dm.add_(s.m) : s.m;
  }
  if (dm.defined() && strategy == kGram1) {  // M = W_1 .* W_2^T
    grad_w[0].add_(dm * weights[1].t());
    grad_w[1].add_((dm * weights[0]).t());
  } else if (dm.defined()) {  // M = W_2 .* C^T, C = W_1 W_3
    grad_w[1].add_(dm * closed.c.t());
    const Tensor cbar = (dm * weights[1]).t();
    grad_w[0].addmm_(cbar, weights[2].t());
    grad_w[2].addmm_(weights[0].t(), cbar);
  }
  return {input_grad ? std::optional<Tensor>(grad_x) : std::nullopt, grad_w, grad_b,
          absent_where_undefined(shift_bar, options), absent_where_undefined(gate_bar, options)};
}

// The activation table as both devices' kernels evaluate it: (4, *y.shape) = act, act', act'',
// act''' at y (what the tests check against autograd).
template <class Kernels>
Tensor activation_derivatives(const Tensor& y, int64_t activation, double p0, double p1) {
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "jacext: expected y of dtype float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "jacext: unknown activation code ", activation);
  const int64_t n = y.numel();
  Tensor out = at::empty({4, n}, y.options());
  if (n > 0) {
    Kernels::carry_forward(y.reshape({1, 1, n}).contiguous(), Tensor(), out[0].view({1, 1, n}), out[1].view({1, n}),
                           out[2].view({1, n}), out[3].view({1, n}), activation, p0, p1, 0, false, 0);
  }
  std::vector<int64_t> sizes = {4};
  sizes.insert(sizes.end(), y.sizes().begin(), y.sizes().end());
  return out.view(sizes);
}

}  // namespace carry
}  // namespace jacext
