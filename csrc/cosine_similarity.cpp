// Host-side argument checks of the cosine-similarity ops (cuda_max_forward, cuda_all_forward,
// cuda_max_backward, cuda_all_backward) and their CPU dispatch-key kernels. Compiled in both the
// CPU-only and the CUDA build, so the checks are testable without a GPU.
#include "cosine_similarity.h"

#include "checks.h"

#include <climits>
#include <string>

#include <c10/core/ScalarType.h>
#include <torch/library.h>

namespace cossim_fast {
namespace {

constexpr const char* kMaxForward = "cossim_fast::cuda_max_forward: ";
constexpr const char* kAllForward = "cossim_fast::cuda_all_forward: ";
constexpr const char* kMaxBackward = "cossim_fast::cuda_max_backward: ";
constexpr const char* kAllBackward = "cossim_fast::cuda_all_backward: ";

// features (B, P, C): 3-D, float32/bfloat16/float16, any strides. Returns N = B*P.
int64_t check_features(const char* op, const at::Tensor& features) {
  check_defined(op, features, "features");
  TORCH_CHECK(
      features.dim() == 3, op, "features must be 3-D (B, P, C), got ", features.dim(), "-D of shape ",
      features.sizes());
  TORCH_CHECK(
      is_float_family(features.scalar_type()), op, "features must be float32, bfloat16 or float16, got ",
      features.scalar_type());
  return features.size(0) * features.size(1);
}

// bank (K, M, C): 3-D, contiguous, float32/bfloat16/float16, C as features', on features' device.
void check_bank(const char* op, const at::Tensor& bank, const at::Tensor& features) {
  check_defined(op, bank, "bank");
  check_same_device(op, bank, "bank", features, "features");
  TORCH_CHECK(bank.dim() == 3, op, "bank must be 3-D (K, M, C), got ", bank.dim(), "-D of shape ", bank.sizes());
  TORCH_CHECK(
      is_float_family(bank.scalar_type()), op, "bank must be float32, bfloat16 or float16, got ", bank.scalar_type());
  TORCH_CHECK(bank.is_contiguous(), op, "bank must be contiguous, got strides ", bank.strides());
  TORCH_CHECK(
      bank.size(2) == features.size(2), op, "bank must have C = ", features.size(2),
      " channels like features (B, P, C) = ", features.sizes(), ", got bank of shape ", bank.sizes());
  TORCH_CHECK(bank.size(0) <= INT_MAX, op, "bank must have at most ", INT_MAX, " classes (K), got ", bank.size(0));
}

const char* precision_op_name(const char* op) {
  return op != nullptr ? op : "cossim_fast: ";
}

}  // namespace

Fp32Precision parse_fp32_precision(c10::string_view precision, const char* op) {
  if (precision == "ieee") return Fp32Precision::kIeee;
  if (precision == "tf32") return Fp32Precision::kTf32;
  TORCH_CHECK(
      false, precision_op_name(op), "fp32_precision must be \"ieee\" or \"tf32\", got \"", std::string(precision.data(), precision.size()),
      "\"");
  return Fp32Precision::kIeee;  // not reached
}

void check_class_forward_args(
    const char* op,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows) {
  const int64_t num_rows = check_features(op, features);
  check_vector(op, labels, "labels", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", features, "features");
  check_bank(op, bank, features);
  check_vector(op, counts, "counts", c10::ScalarType::Long, "int64 (torch.long)", bank.size(0), "K", features, "features");
  check_vector(op, rows, "rows", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", features, "features");
  check_vector(
      op, bounds, "bounds", c10::ScalarType::Long, "int64 (torch.long)", bank.size(0) + 2, "K+2", features, "features");
  // Bounded so that the block counts (rows + tile_rows - 1) / tile_rows cannot overflow int64.
  TORCH_CHECK(tile_rows >= 1 && tile_rows <= INT_MAX, op, "tile_rows must be in [1, ", INT_MAX, "], got ", tile_rows);
  const int64_t blocks = class_tile_blocks(num_rows, bank.size(0), tile_rows);
  TORCH_CHECK(
      blocks <= INT_MAX, op, "tile_rows must cut the ", num_rows, " rows into at most ", INT_MAX,
      " thread blocks (B*P / tile_rows + K), got ", blocks);
}

void check_max_backward_args(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices) {
  const char* op = kMaxBackward;
  const int64_t num_rows = check_features(op, features);
  check_vector(op, grad_values, "grad_values", c10::ScalarType::Float, "float32", num_rows, "B*P", features, "features");
  check_vector(op, labels, "labels", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", features, "features");
  check_bank(op, bank, features);
  check_vector(op, values, "values", c10::ScalarType::Float, "float32", num_rows, "B*P", features, "features");
  check_vector(op, indices, "indices", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", features, "features");
}

void check_all_backward_args(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum) {
  const char* op = kAllBackward;
  const int64_t num_rows = check_features(op, features);
  check_vector(op, grad_ssum, "grad_ssum", c10::ScalarType::Float, "float32", num_rows, "B*P", features, "features");
  check_vector(op, ssum, "ssum", c10::ScalarType::Float, "float32", num_rows, "B*P", features, "features");
  check_defined(op, dsum, "dsum");
  check_same_device(op, dsum, "dsum", features, "features");
  TORCH_CHECK(dsum.scalar_type() == c10::ScalarType::Float, op, "dsum must be float32, got ", dsum.scalar_type());
  TORCH_CHECK(
      dsum.dim() == 2 && dsum.size(0) == num_rows && dsum.size(1) == features.size(2), op, "dsum must have shape (",
      num_rows, ", ", features.size(2), ") = (B*P, C), got ", dsum.sizes());
  TORCH_CHECK(dsum.is_contiguous(), op, "dsum must be contiguous, got strides ", dsum.strides());
}

namespace {

void refuse(const char* op, const at::Tensor& features) {
#ifdef WITH_CUDA
  constexpr const char* kBuild = "";
#else
  constexpr const char* kBuild = " (and this extension was built without CUDA kernels)";
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, op, "this compiled kernel needs CUDA tensors, got tensors on ", features.device(), kBuild,
      "; the \"torch\" backend serves CPU tensors");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cuda_max_forward_cpu(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    c10::string_view fp32_precision) {
  check_class_forward_args(kMaxForward, features, labels, bank, counts, rows, bounds, tile_rows);
  parse_fp32_precision(fp32_precision, kMaxForward);
  refuse(kMaxForward, features);
  return {};  // not reached
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_all_forward_cpu(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    double threshold,
    c10::string_view fp32_precision) {
  (void)threshold;  // any value; NaN selects nothing
  check_class_forward_args(kAllForward, features, labels, bank, counts, rows, bounds, tile_rows);
  parse_fp32_precision(fp32_precision, kAllForward);
  refuse(kAllForward, features);
  return {};  // not reached
}

at::Tensor cuda_max_backward_cpu(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices) {
  check_max_backward_args(grad_values, features, labels, bank, values, indices);
  refuse(kMaxBackward, features);
  return {};  // not reached
}

at::Tensor cuda_all_backward_cpu(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum) {
  check_all_backward_args(grad_ssum, features, ssum, dsum);
  refuse(kAllBackward, features);
  return {};  // not reached
}

TORCH_LIBRARY_IMPL(cossim_fast, CPU, m) {
  m.impl("cuda_max_forward", &cuda_max_forward_cpu);
  m.impl("cuda_all_forward", &cuda_all_forward_cpu);
  m.impl("cuda_max_backward", &cuda_max_backward_cpu);
  m.impl("cuda_all_backward", &cuda_all_backward_cpu);
}

}  // namespace cossim_fast
