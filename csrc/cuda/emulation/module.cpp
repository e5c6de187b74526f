// jacext._C_cuda_emulated (setup.py, JACEXT_CUDA_EMULATION=1): the library jacext_cuda_emulated,
// with the MLP ops' schemas (../../schemas.h) and, for CPU tensors, the CUDA kernel files' kernels
// compiled against the shim (cuda_on_cpu.h); and probes of the shim itself.
#include <Python.h>
#include <torch/library.h>

#include "../../schemas.h"
#include "../common.cuh"

extern "C" PyObject* PyInit__C_cuda_emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace jacext {
namespace {

// Thread t writes base + t to shared memory, then (after the barrier, with sync) reads its
// neighbour's: out[t] = base + (t + 1) % n exactly when the barrier holds every thread until all
// have written.
__global__ void barrier_probe_kernel(int64_t* out, int64_t base, bool sync) {
  __shared__ int64_t slots[1024];
  const unsigned int t = threadIdx.x, n = blockDim.x;
  slots[t] = base + t;
  if (sync) __syncthreads();
  out[blockIdx.x * n + t] = slots[(t + 1) % n];
}

// (blocks, threads) int64: the probe kernel's output; launches of more than 1024 threads or
// 48 KiB of dynamic shared memory fail as on a GPU.
at::Tensor barrier_probe(int64_t blocks, int64_t threads, int64_t shared_bytes, int64_t base, bool sync) {
  at::Tensor out = at::full({blocks, threads}, -1, at::kLong);
  launch_kernel(barrier_probe_kernel, static_cast<unsigned int>(blocks), static_cast<unsigned int>(threads),
                static_cast<size_t>(shared_bytes), nullptr, out.mutable_data_ptr<int64_t>(), base, sync);
  return out;
}

}  // namespace

TORCH_LIBRARY(jacext_cuda_emulated, m) {
  define_mlp_ops(m);
  m.def("barrier_probe(int blocks, int threads, int shared_bytes, int base, bool sync) -> Tensor", &barrier_probe);
}

}  // namespace jacext
