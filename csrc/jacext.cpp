// The library jacext: the MLP ops' schemas (schemas.h; kernels register per dispatch key in cpu/ and
// cuda/) and the CPU workspace's and device formulas' functions.
#include <Python.h>
#include <torch/library.h>

#include "device_formulas.h"
#include "schemas.h"
#include "workspace.h"

// An importable, empty module: loading it runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(jacext, m) {
  jacext::define_mlp_ops(m);
  // The CPU workspace (workspace.h): [cached bytes, bytes in use, limit, hits, misses]; its limit
  // on cached bytes; giving every cached block back.
  m.def("workspace_stats() -> int[]", &jacext::workspace_stats);
  m.def("workspace_set_limit(int bytes) -> ()", &jacext::workspace_set_limit);
  m.def("workspace_release() -> ()", &jacext::workspace_release);
  // Whether the CPU kernels run the device's activation formulas (device_formulas.h).
  m.def("device_formulas() -> bool", &jacext::device_formulas);
}
