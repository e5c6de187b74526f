// The MLP-Jacobian ops on the CPU: the algorithms of ../mlp_jacobian.h with CpuKernels.
#include <torch/library.h>

#include "../mlp_jacobian.h"
#include "mlp_jacobian_kernels.h"

namespace jacext {

TORCH_LIBRARY_IMPL(jacext, CPU, m) {
  m.impl("mlp_jacobian_frobenius", &mlp_jacobian_frobenius<CpuKernels>);
  m.impl("mlp_jacobian", &mlp_jacobian<CpuKernels>);
  m.impl("mlp_jacobian_backward", &mlp_jacobian_backward<CpuKernels>);
}

}  // namespace jacext
