// The CUDA dispatch-key kernel of cossim_fast::ring_buffer_update: argument checks, device
// guard, the device's SM count and current stream around the kernels of
// dictionary_update_kernels.cuh (where their design is described), launched on the GPU.
#include <mutex>
#include <optional>
#include <unordered_map>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dictionary_update.h"
#include "device_launch.cuh"
#include "dictionary_update_kernels.cuh"

namespace cossim_fast {
namespace {

int multiprocessor_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  cache.emplace(device, count);
  return count;
}

void ring_buffer_update_cuda(
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& ptr,
    const at::Tensor& features,
    const at::Tensor& labels,
    const std::optional<at::Tensor>& order,
    const at::Tensor& denom,
    int64_t max_per_class,
    int64_t ignore_index) {
  check_ring_buffer_update_args(bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index);
  TORCH_CHECK(
      bank.is_cuda(), "cossim_fast::ring_buffer_update: the CUDA kernel needs CUDA tensors, got bank on ",
      bank.device());
  if (labels.numel() == 0 || bank.size(0) == 0) return;  // nothing visited / no class: no-op
  const c10::cuda::CUDAGuard guard(bank.device());
  update_kernels::ring_buffer_update(
      bank, counts, ptr, features, labels, order, denom, max_per_class, ignore_index,
      multiprocessor_count(bank.device().index()), on_current_stream(bank.device().index()));
}

}  // namespace

TORCH_LIBRARY_IMPL(cossim_fast, CUDA, m) {
  m.impl("ring_buffer_update", &ring_buffer_update_cuda);
}

}  // namespace cossim_fast
