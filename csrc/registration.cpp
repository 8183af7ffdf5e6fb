// The torch library `step_kernels`. Each op file adds its schema and kernels with
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL; this file owns the one TORCH_LIBRARY block and the
// Python module init, so `import step_kernels._C` registers every op.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(step_kernels, m) {}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "step_kernels C++/CUDA ops", -1, nullptr};
  return PyModule_Create(&module);
}
