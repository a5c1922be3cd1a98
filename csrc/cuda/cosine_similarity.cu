// The CUDA dispatch-key kernels of the cosine-similarity ops: argument checks, device guard and
// current stream around the kernels of cosine_similarity_kernels.cuh (where their design is
// described), launched on the GPU.
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cosine_similarity_kernels.cuh"
#include "device_launch.cuh"

namespace cossim_fast {
namespace {

using kernels::kWarps;

constexpr const char* kMaxForwardOp = "cossim_fast::cuda_max_forward: ";
constexpr const char* kAllForwardOp = "cossim_fast::cuda_all_forward: ";
constexpr const char* kMaxBackwardOp = "cossim_fast::cuda_max_backward: ";
constexpr const char* kAllBackwardOp = "cossim_fast::cuda_all_backward: ";

void check_cuda(const char* op, const at::Tensor& features) {
  TORCH_CHECK(features.is_cuda(), op, "the CUDA kernel needs CUDA tensors, got features on ", features.device());
}

void check_tensor_cores(const char* op, const at::Tensor& features, const at::Tensor& bank, Fp32Precision precision) {
  const bool same_16bit = features.scalar_type() == bank.scalar_type() && features.scalar_type() != at::kFloat;
  const bool tf32 = features.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat &&
      precision == Fp32Precision::kTf32;
  if (!same_16bit && !tf32) return;
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(features.device().index());
  TORCH_CHECK(
      props->major >= 8, op, "the bf16/fp16/tf32 tensor-core kernels need compute capability 8.0 or newer, got ",
      props->major, ".", props->minor, " (", props->name, ")");
}

void check_grid(const char* op, const at::Tensor& features) {
  const int64_t num_rows = features.size(0) * features.size(1);
  TORCH_CHECK(
      (num_rows + kWarps - 1) / kWarps <= std::numeric_limits<int32_t>::max(), op, "features must have at most ",
      static_cast<int64_t>(std::numeric_limits<int32_t>::max()) * kWarps, " rows (B*P), got ", num_rows);
}

std::tuple<at::Tensor, at::Tensor> cuda_max_forward_cuda(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    c10::string_view fp32_precision) {
  check_class_forward_args(kMaxForwardOp, features, labels, bank, counts, rows, bounds, tile_rows);
  const Fp32Precision precision = parse_fp32_precision(fp32_precision, kMaxForwardOp);
  check_cuda(kMaxForwardOp, features);
  const c10::cuda::CUDAGuard guard(features.device());
  check_tensor_cores(kMaxForwardOp, features, bank, precision);
  return kernels::max_forward(
      features, labels, bank, counts, rows, bounds, tile_rows, precision, on_current_stream(features.device().index()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_all_forward_cuda(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    double threshold,
    c10::string_view fp32_precision) {
  check_class_forward_args(kAllForwardOp, features, labels, bank, counts, rows, bounds, tile_rows);
  const Fp32Precision precision = parse_fp32_precision(fp32_precision, kAllForwardOp);
  check_cuda(kAllForwardOp, features);
  const c10::cuda::CUDAGuard guard(features.device());
  check_tensor_cores(kAllForwardOp, features, bank, precision);
  return kernels::all_forward(
      features, labels, bank, counts, rows, bounds, tile_rows, threshold, precision,
      on_current_stream(features.device().index()));
}

at::Tensor cuda_max_backward_cuda(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices) {
  check_max_backward_args(grad_values, features, labels, bank, values, indices);
  check_cuda(kMaxBackwardOp, features);
  check_grid(kMaxBackwardOp, features);
  const c10::cuda::CUDAGuard guard(features.device());
  return kernels::max_backward(grad_values, features, labels, bank, values, indices, on_current_stream(features.device().index()));
}

at::Tensor cuda_all_backward_cuda(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum) {
  check_all_backward_args(grad_ssum, features, ssum, dsum);
  check_cuda(kAllBackwardOp, features);
  check_grid(kAllBackwardOp, features);
  const c10::cuda::CUDAGuard guard(features.device());
  return kernels::all_backward(grad_ssum, features, ssum, dsum, on_current_stream(features.device().index()));
}

}  // namespace

TORCH_LIBRARY_IMPL(cossim_fast, CUDA, m) {
  m.impl("cuda_max_forward", &cuda_max_forward_cuda);
  m.impl("cuda_all_forward", &cuda_all_forward_cuda);
  m.impl("cuda_max_backward", &cuda_max_backward_cuda);
  m.impl("cuda_all_backward", &cuda_all_backward_cuda);
}

}  // namespace cossim_fast
