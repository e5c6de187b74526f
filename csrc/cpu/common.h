// What the CPU kernel files share (mlp_jacobian_cpu.cpp, mlp_laplacian_cpu.cpp): the grain of
// their parallel passes, the dtype check and the tile loop. Mirrored by ../cuda/common.cuh.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>

#include <algorithm>

namespace jacext {

constexpr int64_t kGrain = 2048;  // elements per thread below which a pass runs on one thread

inline void check_cpu_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CPU kernels support float32 and float64, got ", t.scalar_type());
}

// Samples per parallel chunk for a pass of `per_sample` elements per sample.
inline int64_t sample_grain(int64_t per_sample) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_sample, 1));
}

// f(worker, first sample, samples) for each tile of at most `tile` samples (0: one tile of B), the
// tiles spread over the threads; worker is the thread's index, for its own gradient sums. The
// ceil(B / tile) tiles differ by at most one sample (B = 128 in tiles of 22: 22, 22, 21, 21, 21,
// 21, not five of 22 and one of 18), so that the threads' shares are as even as they can be.
template <class F>
void for_tiles(int64_t B, int64_t tile, F&& f) {
  if (B == 0) return;
  if (tile == 0 || tile >= B) {
    f(0, 0, B);
    return;
  }
  const int64_t n_tiles = (B + tile - 1) / tile, base = B / n_tiles, longer = B % n_tiles;
  // The op runs below autograd: its worker threads must too (dispatch keys, grad mode, ...).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n_tiles, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    const int64_t worker = at::get_thread_num();
    for (int64_t t = first; t < last; ++t) f(worker, t * base + std::min(t, longer), base + (t < longer ? 1 : 0));
  });
}

// Whether two independent chains of GEMMs (the MLP's layers and a Gram's products) of about
// f_macs and g_macs multiply-adds pay to run side by side (side_by_side): where the op has exactly
// two threads and neither chain is more than 1.5x the other. MKL splits P2's 128-row GEMMs over
// two threads at 1.2x to 1.4x one thread's rate; two balanced chains side by side run at up to
// 2x (P2's step in 0.94x the time, bench/ab_step.py). With more threads, one chain each would
// leave the rest idle.
inline bool side_by_side_pays(double f_macs, double g_macs) {
  return std::min(f_macs, g_macs) > 0 && std::max(f_macs, g_macs) <= 1.5 * std::min(f_macs, g_macs) &&
         at::get_num_threads() == 2 && !at::in_parallel_region();
}

// f() and g(): side by side on two threads, each with single-threaded GEMMs, when `beside`
// (side_by_side_pays); in turn, each with every thread, otherwise.
template <class F, class G>
void side_by_side(bool beside, F&& f, G&& g) {
  if (!beside) {
    f();
    g();
    return;
  }
  RECORD_FUNCTION("jacext::side_by_side", {});  // named in profiles (and seen by the tests)
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t chain = first; chain < last; ++chain) chain == 0 ? f() : g();
  });
}

}  // namespace jacext
