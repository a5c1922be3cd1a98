// Host-side argument checks shared by every op: each message starts with the op's name and
// names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace cossim_fast {

inline bool is_float_family(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half;
}

inline void check_defined(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), op, name, " must be a tensor, got an undefined tensor");
}

// `t` must live where `reference` (called `reference_name` in the message) lives.
inline void check_same_device(
    const char* op, const at::Tensor& t, const char* name, const at::Tensor& reference, const char* reference_name) {
  TORCH_CHECK(
      t.device() == reference.device(), op, name, " must be on the same device as ", reference_name, " (",
      reference.device(), "), got ", t.device());
}

// A 1-D vector of `length` elements of `dtype`, contiguous, on `reference`'s device.
inline void check_vector(
    const char* op,
    const at::Tensor& t,
    const char* name,
    c10::ScalarType dtype,
    const char* dtype_name,
    int64_t length,
    const char* length_name,
    const at::Tensor& reference,
    const char* reference_name) {
  check_defined(op, t, name);
  check_same_device(op, t, name, reference, reference_name);
  TORCH_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype_name, ", got ", t.scalar_type());
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == length, op, name, " must have shape (", length, ",) = (", length_name, ",), got ",
      t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous, got strides ", t.strides());
}

}  // namespace cossim_fast
