// What the CPU kernel files share (mlp_jacobian_kernels.h, mlp_laplacian_cpu.cpp): the grain of
// their parallel passes, the dtype check and the threads' loops (tiles, two chains side by side).
// Mirrored by ../cuda/common.cuh.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <vector>

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

// at::parallel_for whose threads run as the caller's: the ops run below autograd, and their
// worker threads must too (dispatch keys, grad mode, ...), which at::parallel_for does not carry.
template <class F>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, F&& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    f(first, last);
  });
}

// How for_tiles cuts a batch of B samples into tiles of at most `tile` (0: one tile of B), which
// thread runs which tile, and which sums each tile adds its weight gradients to. The ceil(B / tile)
// tiles differ by at most one sample (B = 128 in tiles of 22: 22, 22, 21, 21, 21, 21, not five of
// 22 and one of 18). Thread i owns lane i, the i-th contiguous share of the tiles, and runs it
// first to last, so that the backward finds the carries that it wrote in the forward still in its
// cache. The last quarter of each lane (its tail) may be taken by a thread that is done with its
// own lane: on a shared machine one thread may run slower than the other (a busy neighbour),
// and the faster one would otherwise wait. So that the gradients do not depend on who ran what, each tail tile adds to sums of its
// own (slot), and a lane's other tiles to the lane's: the slots are added up in their order, and
// the result is the same, to the bit, on every call (torch.autograd.gradcheck checks that).
struct TileSchedule {
  int64_t n_tiles, base, longer = 0, lanes = 1, tail = 0;
  TileSchedule(int64_t B, int64_t tile) : n_tiles(B > 0), base(B) {
    if (B == 0 || tile == 0 || tile >= B) return;
    n_tiles = (B + tile - 1) / tile;
    base = B / n_tiles;
    longer = B % n_tiles;
    lanes = std::min<int64_t>(at::get_num_threads(), n_tiles);
    tail = n_tiles / lanes / 4;
  }
  int64_t lane_first(int64_t lane) const { return lane * n_tiles / lanes; }
  int64_t first_sample(int64_t t) const { return t * base + std::min(t, longer); }
  int64_t samples(int64_t t) const { return base + (t < longer ? 1 : 0); }
  // One sum slot per lane, and one per tail tile.
  int64_t slots() const { return lanes * (1 + tail); }
  int64_t slot(int64_t lane, int64_t t) const {
    const int64_t from_end = lane_first(lane + 1) - 1 - t;
    return from_end < tail ? lanes + lane * tail + from_end : lane;
  }
};

// f(slot, first sample, samples) for each tile of TileSchedule(B, tile), over the threads.
template <class F>
void for_tiles(int64_t B, int64_t tile, F&& f) {
  const TileSchedule s(B, tile);
  if (s.n_tiles <= 1) {
    if (B > 0) f(0, 0, B);
    return;
  }
  std::vector<std::atomic<bool>> taken(s.n_tiles);
  for (auto& flag : taken) flag.store(false, std::memory_order_relaxed);
  parallel_for_as_caller(0, s.lanes, 1, [&](int64_t first, int64_t last) {
    auto run = [&](int64_t lane, int64_t t) { f(s.slot(lane, t), s.first_sample(t), s.samples(t)); };
    for (int64_t lane = first; lane < last; ++lane) {
      for (int64_t t = s.lane_first(lane); t < s.lane_first(lane + 1); ++t) {
        if (!taken[t].exchange(true)) run(lane, t);
      }
    }
    for (int64_t k = 1; k < s.lanes; ++k) {  // the other lanes' tails, from their ends
      const int64_t lane = (last - 1 + k) % s.lanes;
      for (int64_t t = s.lane_first(lane + 1) - 1; t >= s.lane_first(lane + 1) - s.tail; --t) {
        if (taken[t].exchange(true)) break;  // its owner has come this far
        RECORD_FUNCTION("jacext::tile_taken_over", {});  // named in profiles (and counted by the tests)
        run(lane, t);
      }
    }
  });
}

// Whether two independent chains of GEMMs (the MLP's layers and a Gram's products) of about
// f_macs and g_macs multiply-adds pay to run side by side (side_by_side): where the op has exactly
// two threads and neither chain is more than 1.5 times the other. MKL splits a GEMM of a
// hundred-odd rows over two threads well below twice one thread's rate; two balanced chains side by
// side, one thread each, come close to it (docs/benchmarks.md). With more threads, one chain each
// would leave the rest idle.
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
  parallel_for_as_caller(0, 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t chain = first; chain < last; ++chain) chain == 0 ? f() : g();
  });
}

}  // namespace jacext
