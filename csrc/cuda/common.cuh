// What the CUDA kernel files share (mlp_jacobian_kernels.cuh, mlp_laplacian_cuda.cu): the launch
// shape and the launch itself, the dtype check, the grid-stride loop, the library the kernels
// register in. Mirrors ../cpu/common.h.
//
// With JACEXT_CUDA_EMULATION (setup.py's emulated build) the files are compiled as C++ against the
// CPU shim emulation/cuda_on_cpu.h instead of the CUDA headers, and register their kernels for CPU
// tensors in the library jacext_cuda_emulated.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <utility>

#ifdef JACEXT_CUDA_EMULATION
#include "emulation/cuda_on_cpu.h"
#define JACEXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(jacext_cuda_emulated, CPU, m)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define JACEXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(jacext, CUDA, m)
#endif

namespace jacext {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

inline void check_cuda_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CUDA kernels support float32 and float64, got ", t.scalar_type());
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) and the launch check; every launch goes
// through here so that the emulated build can run it on the CPU.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
#ifdef JACEXT_CUDA_EMULATION
  (void)stream;
  cuda_on_cpu::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace jacext

#define JACEXT_GRID_STRIDE(i, n)                                                       \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
