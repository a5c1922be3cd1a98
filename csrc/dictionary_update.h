// The dictionary update of METHOD.md 5 (per-class ring buffer, in place): declarations shared by
// the host-side checks (dictionary_update.cpp, compiled in every build) and the CUDA kernel
// (cuda/dictionary_update.cu, compiled only with -DWITH_CUDA).
//
// Schema (registered in cossim_fast.cpp):
//   cossim_fast::ring_buffer_update(Tensor(a!) bank, Tensor(b!) counts, Tensor(c!) ptr,
//       Tensor features, Tensor labels, Tensor? order, Tensor denom,
//       int max_per_class, int ignore_index) -> ()
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

namespace cossim_fast {

// Validates every argument of ring_buffer_update; throws c10::Error (RuntimeError in Python)
// whose message names the offending argument and what was expected:
//   bank     (K, M, C) contiguous, float32/bfloat16/float16, M >= 1
//   counts   (K,) int64 contiguous, on bank's device
//   ptr      (K,) int64 contiguous, on bank's device
//   features (B, P, C) float32/bfloat16/float16 (may differ from bank's dtype), any strides
//   labels   (B*P,) int64 contiguous
//   order    None or (B*P,) int64 contiguous
//   denom    (B*P,) float32 contiguous
// and all of them on bank's device.
void check_ring_buffer_update_args(
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& ptr,
    const at::Tensor& features,
    const at::Tensor& labels,
    const std::optional<at::Tensor>& order,
    const at::Tensor& denom,
    int64_t max_per_class,
    int64_t ignore_index);

// CPU dispatch-key kernel: runs the checks, then refuses (the compiled kernel needs CUDA
// tensors; the pure-PyTorch "torch" backend serves CPU tensors).
void ring_buffer_update_cpu(
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& ptr,
    const at::Tensor& features,
    const at::Tensor& labels,
    const std::optional<at::Tensor>& order,
    const at::Tensor& denom,
    int64_t max_per_class,
    int64_t ignore_index);

// "cuda=<CUDART_VERSION>;archs=<arch list>;torch=<major.minor>" or "cuda=none;torch=<major.minor>".
std::string extension_info();

}  // namespace cossim_fast
