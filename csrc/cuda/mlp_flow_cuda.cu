// The flow ops on CUDA: the algorithms of ../mlp_flow.h with the MLP-Jacobian ops' CudaKernels.
#include <torch/library.h>

#include "../mlp_flow.h"
#include "mlp_jacobian_kernels.cuh"

namespace jacext {

JACEXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("mlp_flow", &mlp_flow<CudaKernels>);
  m.impl("mlp_flow_backward", &mlp_flow_backward<CudaKernels>);
}

}  // namespace jacext
