// The flow ops on the CPU: the algorithms of ../mlp_flow.h with the MLP-Jacobian ops' CpuKernels.
#include <torch/library.h>

#include "../mlp_flow.h"
#include "mlp_jacobian_kernels.h"

namespace jacext {

TORCH_LIBRARY_IMPL(jacext, CPU, m) {
  m.impl("mlp_flow", &mlp_flow<CpuKernels>);
  m.impl("mlp_flow_backward", &mlp_flow_backward<CpuKernels>);
}

}  // namespace jacext
