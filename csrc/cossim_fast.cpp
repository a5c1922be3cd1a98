// cossim_fast._C: the one TORCH_LIBRARY(cossim_fast, ...) block of the package, plus a tiny Python
// module stub (no pybind11, as pytorch/extension-cpp does): `import cossim_fast._C` loads this
// shared object, which runs the static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations. The
// ops are then reached as torch.ops.cossim_fast.<name>. Python adds further ops to the same
// namespace with torch.library FRAGMENT libraries.
#include <Python.h>

#include <string>

#include <torch/library.h>

#include "dictionary_update.h"

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

// Set by setup.py as bare tokens (shell- and ninja-safe), turned into strings here.
#define COSSIM_FAST_STR_(...) #__VA_ARGS__
#define COSSIM_FAST_STR(...) COSSIM_FAST_STR_(__VA_ARGS__)
#ifndef COSSIM_FAST_CUDA_ARCHS
#define COSSIM_FAST_CUDA_ARCHS unknown
#endif
#ifndef COSSIM_FAST_TORCH_VERSION
#define COSSIM_FAST_TORCH_VERSION unknown
#endif

extern "C" {
// Creates an empty module `_C`; importing it loads this library and its registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name of module
      "cossim_fast compiled kernels; the ops live in torch.ops.cossim_fast",  // documentation
      -1,    // size of per-interpreter state (-1: global state)
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace cossim_fast {

std::string extension_info() {
  std::string info;
#ifdef WITH_CUDA
  // setup.py joins the arch list with '_' (';' would end a shell command); report it with ','.
  std::string archs = COSSIM_FAST_STR(COSSIM_FAST_CUDA_ARCHS);
  for (char& ch : archs) {
    if (ch == '_') ch = ',';
  }
  info = "cuda=" + std::to_string(CUDART_VERSION) + ";archs=" + archs;
#else
  info = "cuda=none";
#endif
  info += ";torch=" COSSIM_FAST_STR(COSSIM_FAST_TORCH_VERSION);
  return info;
}

}  // namespace cossim_fast

TORCH_LIBRARY(cossim_fast, m) {
  // The fake (meta) kernels of the ops below are registered in Python, in this module.
  m.set_python_module("cossim_fast._extension");
  m.def(
      "ring_buffer_update(Tensor(a!) bank, Tensor(b!) counts, Tensor(c!) ptr, Tensor features, "
      "Tensor labels, Tensor? order, Tensor denom, int max_per_class, int ignore_index) -> ()");
  // Class-bucketed cosine similarity (METHOD.md 3 and 4; cosine_similarity.h): forward over the
  // rows grouped by class on the device (rows sorted by class, the K + 2 class bounds), in
  // tiles of tile_rows rows that each thread block finds itself.
  m.def(
      "cuda_max_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts, Tensor rows, "
      "Tensor bounds, int tile_rows, str fp32_precision) -> (Tensor values, Tensor indices)");
  m.def(
      "cuda_all_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts, Tensor rows, "
      "Tensor bounds, int tile_rows, float threshold, str fp32_precision) -> (Tensor count, Tensor ssum, Tensor dsum)");
  m.def(
      "cuda_max_backward(Tensor grad_values, Tensor features, Tensor labels, Tensor bank, Tensor values, "
      "Tensor indices) -> Tensor");
  m.def("cuda_all_backward(Tensor grad_ssum, Tensor features, Tensor ssum, Tensor dsum) -> Tensor");
  // No tensor arguments: a catch-all kernel, callable as torch.ops.cossim_fast.extension_info().
  m.def("extension_info() -> str", &cossim_fast::extension_info);
}
