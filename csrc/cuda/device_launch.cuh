// The launcher of the GPU build: the kernel headers' host code calls
// `launch(kernel, grid, threads, args...)`; here that is kernel<<<grid, threads, 0, stream>>>
// on the caller's stream (the CPU emulation in tests/cuda_emulation has its own launcher).
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace cossim_fast {

struct DeviceLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, int threads, const Args&... args) const {
    kernel<<<grid, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// On the current stream of `device` (the caller holds its device guard).
inline DeviceLaunch on_current_stream(c10::DeviceIndex device) {
  return DeviceLaunch{c10::cuda::getCurrentCUDAStream(device).stream()};
}

}  // namespace cossim_fast
