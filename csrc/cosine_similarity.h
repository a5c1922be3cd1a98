// The class-bucketed cosine-similarity forward and backward of METHOD.md 3 and 4: declarations
// shared by the host-side checks (cosine_similarity.cpp, compiled in every build) and the CUDA
// kernels (cuda/cosine_similarity_kernels.cuh, launched by cuda/cosine_similarity.cu, compiled
// only with -DWITH_CUDA; the tests also compile the kernels for a CPU emulation).
//
// Schemas (registered in cossim_fast.cpp):
//   cossim_fast::cuda_max_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts,
//       Tensor rows, Tensor bounds, int tile_rows, str fp32_precision)
//       -> (Tensor values, Tensor indices)
//   cossim_fast::cuda_all_forward(Tensor features, Tensor labels, Tensor bank, Tensor counts,
//       Tensor rows, Tensor bounds, int tile_rows, float threshold, str fp32_precision)
//       -> (Tensor count, Tensor ssum, Tensor dsum)
//   cossim_fast::cuda_max_backward(Tensor grad_values, Tensor features, Tensor labels,
//       Tensor bank, Tensor values, Tensor indices) -> Tensor
//   cossim_fast::cuda_all_backward(Tensor grad_ssum, Tensor features, Tensor ssum,
//       Tensor dsum) -> Tensor
//
// The forward ops take the rows grouped by class on the device by the caller
// (cossim_fast/backends/schedule.py, `group_by_class`): `rows` = the N row ids sorted by class,
// `bounds` = (K + 2,) int64, class k's rows are rows[bounds[k]:bounds[k + 1]] (the rows of no
// class last). Each class's rows are cut into tiles of `tile_rows`, one thread block each; a
// small kernel writes every block's (class, start, end) from `bounds` before the forward runs.
// A row takes part only if labels[row] equals its tile's class, so wrong bounds can leave rows
// at their initial value but can never make a block read or write out of bounds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace cossim_fast {

// How fp32 x fp32 dot products run: exact fp32 FMAs on the CUDA cores, or TF32 tensor cores.
enum class Fp32Precision { kIeee, kTf32 };

// Thread blocks of a forward launch: an upper bound on the tiles of `tile_rows` rows that the
// classes' rows are cut into (each class wastes less than one tile), known without reading the
// class sizes back from the device. Blocks past the last tile exit at once.
inline int64_t class_tile_blocks(int64_t num_rows, int64_t num_classes, int64_t tile_rows) {
  return (num_rows + tile_rows - 1) / tile_rows + std::min(num_classes, num_rows);
}

// "ieee" or "tf32"; anything else throws (the message names the argument `fp32_precision`).
Fp32Precision parse_fp32_precision(c10::string_view precision, const char* op);

// Validates the arguments of cuda_max_forward / cuda_all_forward; throws c10::Error (RuntimeError
// in Python) whose message names the offending argument and what was expected:
//   features (B, P, C) float32/bfloat16/float16, any strides
//   labels   (B*P,) int64 contiguous
//   bank     (K, M, C) contiguous, float32/bfloat16/float16 (may differ from features' dtype)
//   counts   (K,) int64 contiguous
//   rows     (B*P,) int64 contiguous
//   bounds   (K + 2,) int64 contiguous
//   tile_rows >= 1, with at most 2^31 - 1 thread blocks (B*P / tile_rows + K)
// and all of them on features' device. `op` is the message prefix ("cossim_fast::<name>: ").
void check_class_forward_args(
    const char* op,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows);

// cuda_max_backward: grad_values, values (N,) float32 contiguous; indices (N,) int64 contiguous;
// features, labels and bank as above (N = B*P); all on features' device.
void check_max_backward_args(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices);

// cuda_all_backward: grad_ssum, ssum (N,) float32 contiguous; dsum (N, C) float32 contiguous;
// features (B, P, C) as above; all on features' device.
void check_all_backward_args(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum);

// CPU dispatch-key kernels: run the checks, then refuse (the compiled kernels need CUDA tensors;
// the pure-PyTorch "torch" backend serves CPU tensors).
std::tuple<at::Tensor, at::Tensor> cuda_max_forward_cpu(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    c10::string_view fp32_precision);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_all_forward_cpu(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    double threshold,
    c10::string_view fp32_precision);

at::Tensor cuda_max_backward_cpu(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices);

at::Tensor cuda_all_backward_cpu(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum);

}  // namespace cossim_fast
