// JACEXT_DEVICE_FORMULAS=1 in the environment (read once, when the library loads): the CPU kernels
// evaluate every activation by the formulas of activations.h, as the CUDA kernels do, instead of
// taking tanh, sigmoid, silu, softplus and smooth_leaky_relu from ATen's vectorized kernels. CI runs
// the whole test suite a second time so: the very formulas the GPU runs are checked on every
// commit, on machines without a GPU. The sums accumulate in double either way, on both devices.
#pragma once
#include <cstdlib>
#include <cstring>

namespace jacext {

inline bool device_formulas() {
  static const bool on = [] {
    const char* value = std::getenv("JACEXT_DEVICE_FORMULAS");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return on;
}

}  // namespace jacext
