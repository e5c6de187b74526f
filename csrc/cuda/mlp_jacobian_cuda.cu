// The MLP-Jacobian ops on CUDA: the algorithms of ../mlp_jacobian.h with CudaKernels.
#include <torch/library.h>

#include "../mlp_jacobian.h"
#include "mlp_jacobian_kernels.cuh"

namespace jacext {

JACEXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("mlp_jacobian_frobenius", &mlp_jacobian_frobenius<CudaKernels>);
  m.impl("mlp_jacobian", &mlp_jacobian<CudaKernels>);
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward<CudaKernels>);
}

}  // namespace jacext
