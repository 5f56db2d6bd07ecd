// softcal: op schemas and module init.
//
// Every op is defined once, in csrc/schemas.h; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(softcal, CPU, m), csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL(softcal, CUDA, m)). Fake kernels and autograd live in softcal/_ops.py.
// The conventions shared by all ops head csrc/schemas.h; every op's argument checks are in
// csrc/checks.h; the maths and the kernel design are in docs/design.md.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// A bare Python module: importing softcal._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "softcal compiled kernels",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(softcal, m) { softcal::define_ops(m); }
