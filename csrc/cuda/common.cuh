// What the CUDA kernel files share (mlp_jacobian_kernels.cuh, mlp_laplacian_cuda.cu): the launch
// shape, the dtype check and the grid-stride loop. Mirrors ../cpu/common.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace jacext {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

inline void check_cuda_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "jacext: CUDA kernels support float32 and float64, got ", t.scalar_type());
}

}  // namespace jacext

#define JACEXT_GRID_STRIDE(i, n)                                                       \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
