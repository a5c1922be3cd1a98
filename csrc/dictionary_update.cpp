// Host-side argument checks of cossim_fast::ring_buffer_update and its CPU dispatch-key kernel.
// Compiled in both the CPU-only and the CUDA build, so the checks are testable without a GPU.
#include "dictionary_update.h"

#include "checks.h"

#include <climits>

#include <c10/core/ScalarType.h>
#include <torch/library.h>

namespace cossim_fast {
namespace {

constexpr const char* kOp = "cossim_fast::ring_buffer_update: ";

}  // namespace

void check_ring_buffer_update_args(
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& ptr,
    const at::Tensor& features,
    const at::Tensor& labels,
    const std::optional<at::Tensor>& order,
    const at::Tensor& denom,
    int64_t max_per_class,
    int64_t ignore_index) {
  (void)max_per_class;  // any value: < 0 means no cap
  (void)ignore_index;   // any value
  TORCH_CHECK(bank.defined(), kOp, "bank must be a tensor, got an undefined tensor");
  TORCH_CHECK(
      bank.dim() == 3, kOp, "bank must be 3-D (K, M, C), got ", bank.dim(), "-D of shape ", bank.sizes());
  TORCH_CHECK(
      is_float_family(bank.scalar_type()), kOp, "bank must be float32, bfloat16 or float16, got ",
      bank.scalar_type());
  TORCH_CHECK(bank.is_contiguous(), kOp, "bank must be contiguous, got strides ", bank.strides());
  const int64_t num_classes = bank.size(0);
  const int64_t slots = bank.size(1);
  const int64_t dim = bank.size(2);
  TORCH_CHECK(slots >= 1, kOp, "bank must have at least one slot per class (M >= 1), got shape ", bank.sizes());
  TORCH_CHECK(
      num_classes <= INT_MAX, kOp, "bank must have at most ", INT_MAX, " classes (K), got ", num_classes);

  TORCH_CHECK(counts.defined(), kOp, "counts must be a tensor, got an undefined tensor");
  check_vector(kOp, counts, "counts", c10::ScalarType::Long, "int64 (torch.long)", num_classes, "K", bank, "bank");
  TORCH_CHECK(ptr.defined(), kOp, "ptr must be a tensor, got an undefined tensor");
  check_vector(kOp, ptr, "ptr", c10::ScalarType::Long, "int64 (torch.long)", num_classes, "K", bank, "bank");

  TORCH_CHECK(features.defined(), kOp, "features must be a tensor, got an undefined tensor");
  check_same_device(kOp, features, "features", bank, "bank");
  TORCH_CHECK(
      features.dim() == 3, kOp, "features must be 3-D (B, P, C), got ", features.dim(), "-D of shape ",
      features.sizes());
  TORCH_CHECK(
      features.size(2) == dim, kOp, "features must have C = ", dim, " channels like bank (K, M, C) = ",
      bank.sizes(), ", got features of shape ", features.sizes());
  TORCH_CHECK(
      is_float_family(features.scalar_type()), kOp, "features must be float32, bfloat16 or float16, got ",
      features.scalar_type());
  const int64_t num_rows = features.size(0) * features.size(1);

  TORCH_CHECK(labels.defined(), kOp, "labels must be a tensor, got an undefined tensor");
  check_vector(kOp, labels, "labels", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", bank, "bank");
  if (order.has_value() && order->defined()) {
    check_vector(kOp, *order, "order", c10::ScalarType::Long, "int64 (torch.long)", num_rows, "B*P", bank, "bank");
  }
  TORCH_CHECK(denom.defined(), kOp, "denom must be a tensor, got an undefined tensor");
  check_vector(kOp, denom, "denom", c10::ScalarType::Float, "float32", num_rows, "B*P", bank, "bank");
}

void ring_buffer_update_cpu(
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
#ifdef WITH_CUDA
  constexpr const char* kBuild = "";
#else
  constexpr const char* kBuild = " (and this extension was built without CUDA kernels)";
#endif
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, kOp, "this compiled kernel needs CUDA tensors, got tensors on ", bank.device(), kBuild,
      "; the \"torch\" backend serves CPU tensors");
}

TORCH_LIBRARY_IMPL(cossim_fast, CPU, m) {
  m.impl("ring_buffer_update", &ring_buffer_update_cpu);
}

}  // namespace cossim_fast
