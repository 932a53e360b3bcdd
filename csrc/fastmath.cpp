// Schemas of the fastmath custom ops. Each op's CUDA implementation registers itself in its
// own .cu file with TORCH_LIBRARY_IMPL(fastmath, CUDA, m); fake (meta) and autograd
// registrations live in Python beside each op.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: importing fastmath_kernels._C loads this library and runs the static
// registrations below. No pybind11 bindings are needed, which keeps the build short.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmath, m) {
  // scale_mode: 0 = group std, 1 = batch std, 2 = none (mean-centred only).
  m.def("group_advantages(Tensor rewards, int group_size, int scale_mode, float eps) -> Tensor");
}
