// CUDA C++ on the CPU: the test-only shim with which the emulated build (setup.py,
// JACEXT_CUDA_EMULATION=1) compiles the .cu files with g++ into jacext._C_cuda_emulated, so that the
// kernels' bodies run on machines without a GPU (tests/test_cuda_emulated.py; docs/cuda-emulation.md
// says what that checks and what it cannot).
//
// A launch runs every block of the grid; blocks are split over the OS threads (at::parallel_for),
// and each block's threads run as cooperative fibers on one OS thread, one after the
// other: a fiber runs until it reaches __syncthreads() or returns, then the next one runs. So
// __syncthreads() is a real barrier (every live fiber of the block reaches it before any goes on)
// and a missing one shows: a thread reads shared memory before the threads that write it have run.
// __shared__ variables are static thread_local: one copy per OS thread, which runs one block at a
// time, so each block has its own (uninitialized between blocks, as on a GPU). threadIdx, blockIdx,
// blockDim and gridDim are those of the running fiber. A launch fails as a GPU's would where the
// block has more than 1024 threads (or a dimension over its limit) or the dynamic shared memory
// exceeds 48 KiB; static shared memory is a compile-time figure that nvcc's ptxas reports and
// limits (.ci/ptxas_check.sh).
//
// Only what the .cu files use is here; the ATen CUDA names they use (the current stream, the device
// guard, the launch check) are stand-ins that do nothing, and their GEMMs run through ATen on the
// CPU tensors that the emulated ops take.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define threadIdx (::cuda_on_cpu::context().thread_idx)
#define blockIdx (::cuda_on_cpu::context().block_idx)
#define blockDim (::cuda_on_cpu::context().block_dim)
#define gridDim (::cuda_on_cpu::context().grid_dim)
#define __syncthreads() ::cuda_on_cpu::syncthreads()

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct CUstream_st*;

namespace cuda_on_cpu {

constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr size_t kStackBytes = 64 * 1024;  // per fiber: the kernels' frames and libm's

struct Context {
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
};

// The running fiber's indices, per OS thread (a block's fibers all run on one).
inline Context& context() {
  static thread_local Context c;
  return c;
}

// A fiber's saved context and the switch between two: on x86-64 a few instructions (the
// callee-saved registers go on the stack, the stack pointer into the context), elsewhere ucontext.
#if defined(__x86_64__) && defined(__GNUC__)
struct FiberContext {
  void* sp = nullptr;
};
// A fresh context that enters start() on the stack [stack, stack + bytes) (start never returns).
inline void make_context(FiberContext& c, char* stack, size_t bytes, void (*start)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 16);  // start's entry: (sp + 8) % 16 == 8, as after a call
  *sp = reinterpret_cast<void*>(start);
  c.sp = sp;
}
// Saves the running context in `from` and resumes `to`: at its own switch's label 1, or at start().
inline void switch_context(FiberContext& from, FiberContext& to) {
  void** from_sp = &from.sp;
  void** to_sp = &to.sp;
  asm volatile(
      "subq $128, %%rsp\n\t"  // past the red zone
      "pushq %%rbp\n\t"
      "leaq 1f(%%rip), %%rax\n\t"
      "pushq %%rax\n\t"
      "movq %%rsp, (%0)\n\t"
      "movq (%1), %%rsp\n\t"
      "ret\n\t"
      "1:\n\t"
      "popq %%rbp\n\t"
      "addq $128, %%rsp\n\t"
      : "+D"(from_sp), "+S"(to_sp)
      :
      : "rax", "rbx", "rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "memory", "cc", "xmm0",
        "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
        "xmm14", "xmm15");
}
#else
struct FiberContext {
  ucontext_t uc;
};
inline void make_context(FiberContext& c, char* stack, size_t bytes, void (*start)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, start, 0);
}
inline void switch_context(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Runs one block at a time, its threads as fibers; one runner per OS thread. A fiber runs threads
// in a loop: after a thread returns it waits for the next block, so a block costs a switch into and
// out of each thread (and one more per barrier), not a new fiber.
class BlockRunner {
 public:
  static BlockRunner& here() {
    static thread_local BlockRunner runner;
    return runner;
  }
  BlockRunner() { fibers_.reserve(kMaxThreadsPerBlock); }  // a saved context must not move

  template <class Body>
  void run(const Body& body, unsigned int n) {
    body_ = &body;
    call_ = [](const void* b) { (*static_cast<const Body*>(b))(); };
    while (fibers_.size() < n) fibers_.emplace_back();
    state_.resize(fibers_.size(), kRunning);
    for (unsigned int i = 0; i < n; ++i) {
      if (state_[i] == kIdle) continue;  // parked in fiber_main's loop
      if (!fibers_[i].stack) fibers_[i].stack.reset(new char[kStackBytes]);
      make_context(fibers_[i].context, fibers_[i].stack.get(), kStackBytes, &BlockRunner::fiber_main);
      state_[i] = kIdle;
    }
    const dim3 dim = context().block_dim;
    bool waiting = true;
    while (waiting) {  // one round: every live fiber runs to its next barrier or to its end
      waiting = false;
      for (unsigned int i = 0; i < n; ++i) {
        if (state_[i] == kDone) continue;
        context().thread_idx = {i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
        current_ = i;
        state_[i] = kRunning;
        switch_context(scheduler_, fibers_[i].context);
        waiting = waiting || state_[i] == kAtBarrier;
      }
      if (error_) break;
    }
    for (unsigned int i = 0; i < n; ++i) {
      if (state_[i] == kDone) state_[i] = kIdle;  // a fiber left at a barrier (an error) starts afresh
    }
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  void barrier() {
    state_[current_] = kAtBarrier;
    switch_context(fibers_[current_].context, scheduler_);
  }

 private:
  enum State { kIdle, kRunning, kAtBarrier, kDone };
  struct Fiber {
    FiberContext context;
    std::unique_ptr<char[]> stack;
  };

  [[noreturn]] static void fiber_main() {
    BlockRunner& self = here();
    for (;;) {
      try {
        self.call_(self.body_);
      } catch (...) {
        self.error_ = std::current_exception();
      }
      self.state_[self.current_] = kDone;
      switch_context(self.fibers_[self.current_].context, self.scheduler_);
    }
  }

  const void* body_ = nullptr;
  void (*call_)(const void*) = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<State> state_;
  FiberContext scheduler_;
  unsigned int current_ = 0;
  std::exception_ptr error_;
};

inline void syncthreads() { BlockRunner::here().barrier(); }

// kernel<<<grid, block, shared_bytes>>>(args...): the arguments converted to the kernel's parameter
// types once, as a launch copies them, then every block of the grid.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock && block.x <= 1024 && block.y <= 1024 && block.z <= 64,
              "CUDA emulation: invalid configuration argument: a block of ", block.x, " x ", block.y, " x ",
              block.z, " threads (at most 1024 in all)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA emulation: invalid configuration argument: a grid of ", grid.x, " x ", grid.y, " x ", grid.z,
              " blocks");
  TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "CUDA emulation: too many resources requested for launch: ",
              shared_bytes, " bytes of dynamic shared memory (at most ", kMaxSharedBytes, ")");
  TORCH_CHECK(shared_bytes == 0, "CUDA emulation: dynamic shared memory (extern __shared__) is not emulated");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Context& c = context();
      c.block_dim = block;
      c.grid_dim = grid;
      c.block_idx = {static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>(b / grid.x % grid.y),
                     static_cast<unsigned int>(b / (int64_t(grid.x) * grid.y))};
      BlockRunner::here().run([&] { std::apply(kernel, params); }, static_cast<unsigned int>(threads));
    }
  });
}

}  // namespace cuda_on_cpu

// The ATen CUDA names the .cu files use, as stand-ins that do nothing on the CPU.
namespace at::cuda {
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(const at::Device&) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (false)
