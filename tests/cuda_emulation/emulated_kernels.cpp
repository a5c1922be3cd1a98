// The CUDA backend's cosine-similarity kernels (csrc/cuda/cosine_similarity_kernels.cuh), run
// on CPU tensors through the emulation of cuda_emulation.h, and the emulation's self checks: a
// Python module for the tests, built on demand by tests/cuda_emulation/__init__.py. The inputs
// are those the CUDA backend passes to its ops (checked there); the outputs are the ops'.
#include <string>

#include <torch/extension.h>

#include "cuda/cosine_similarity_kernels.cuh"
#include "cuda/dictionary_update_kernels.cuh"
#include "self_checks.h"

namespace {

using cossim_fast::Fp32Precision;
namespace kernels = cossim_fast::kernels;

struct EmulatedLaunch {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, const Args&... args) const {
    cuda_emulation::launch(grid, threads, [&] { kernel(args...); });
  }
};

Fp32Precision precision_of(const std::string& name) {
  TORCH_CHECK(name == "ieee" || name == "tf32", "fp32_precision must be \"ieee\" or \"tf32\", got \"", name, "\"");
  return name == "tf32" ? Fp32Precision::kTf32 : Fp32Precision::kIeee;
}

void check_cpu(const at::Tensor& features) {
  TORCH_CHECK(features.device().is_cpu(), "the CUDA emulation runs on CPU tensors, got features on ",
              features.device());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The CUDA forward/backward kernels of cossim_fast, emulated on the CPU (tests only).";
  m.def("cuda_max_forward",
        [](const at::Tensor& features, const at::Tensor& labels, const at::Tensor& bank, const at::Tensor& counts,
           const at::Tensor& rows, const at::Tensor& bounds, int64_t tile_rows, const std::string& fp32_precision) {
          check_cpu(features);
          return kernels::max_forward(features, labels, bank, counts, rows, bounds, tile_rows,
                                      precision_of(fp32_precision), EmulatedLaunch{});
        });
  m.def("cuda_all_forward",
        [](const at::Tensor& features, const at::Tensor& labels, const at::Tensor& bank, const at::Tensor& counts,
           const at::Tensor& rows, const at::Tensor& bounds, int64_t tile_rows, double threshold,
           const std::string& fp32_precision) {
          check_cpu(features);
          return kernels::all_forward(features, labels, bank, counts, rows, bounds, tile_rows, threshold,
                                      precision_of(fp32_precision), EmulatedLaunch{});
        });
  m.def("cuda_max_backward", [](const at::Tensor& grad_values, const at::Tensor& features, const at::Tensor& labels,
                                const at::Tensor& bank, const at::Tensor& values, const at::Tensor& indices) {
    check_cpu(features);
    return kernels::max_backward(grad_values, features, labels, bank, values, indices, EmulatedLaunch{});
  });
  m.def("cuda_all_backward",
        [](const at::Tensor& grad_ssum, const at::Tensor& features, const at::Tensor& ssum, const at::Tensor& dsum) {
          check_cpu(features);
          return kernels::all_backward(grad_ssum, features, ssum, dsum, EmulatedLaunch{});
        });
  m.def(
      "ring_buffer_update",
      [](const at::Tensor& bank, const at::Tensor& counts, const at::Tensor& ptr, const at::Tensor& features,
         const at::Tensor& labels, const std::optional<at::Tensor>& order, const at::Tensor& denom,
         int64_t max_per_class, int64_t ignore_index, int64_t multiprocessors) {
        check_cpu(features);
        cossim_fast::update_kernels::ring_buffer_update(bank, counts, ptr, features, labels, order, denom,
                                                        max_per_class, ignore_index, multiprocessors, EmulatedLaunch{});
      },
      pybind11::arg("bank"), pybind11::arg("counts"), pybind11::arg("ptr"), pybind11::arg("features"),
      pybind11::arg("labels"), pybind11::arg("order"), pybind11::arg("denom"), pybind11::arg("max_per_class"),
      pybind11::arg("ignore_index"), pybind11::arg("multiprocessors") = 132);  // an H100's SMs
  m.def("set_schedule", &cuda_emulation::set_schedule,
        "0: threads and blocks in index order, 1: reversed, else random from this seed");
  m.def("warp_sum", &self_checks::warp_sum);
  m.def("racy", &self_checks::racy);
  m.def("overtaking_race", &self_checks::overtaking_race);
  m.def("sync_or", &self_checks::sync_or);
  m.def("wmma_matmul", &self_checks::wmma_matmul);
  m.def("async_copy", &self_checks::async_copy);
  m.def("misuse", &self_checks::misuse);
  m.def("read_past_end", &self_checks::read_past_end);
  m.def("read_shared_past_end", &self_checks::read_shared_past_end);
  m.def("read_unwritten_shared", &self_checks::read_unwritten_shared);
  m.def("read_misaligned_vector", &self_checks::read_misaligned_vector);
  m.def("launch_threads", &self_checks::launch_threads);
}
