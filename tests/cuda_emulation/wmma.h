// nvcuda::wmma for cuda_emulation.h: the subset the kernels use, with the whole tile in every
// lane (the hardware's distribution over lanes is opaque to kernels that use only the WMMA API,
// as ours do). Every operation is warp-wide: all 32 lanes, at one call site, with the same
// pointer and ldm; pointers 32-byte aligned and ldm a multiple of 16 bytes, as the CUDA
// Programming Guide requires of load_matrix_sync and store_matrix_sync.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "scheduler.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  element_type x[num_elements];  // element (r, c) at x[r * kCols + c]
};

// cvt.rna.tf32.f32: 10 mantissa bits, round to nearest with ties away from zero.
inline float __float_to_tf32(float value) {
  if (!std::isfinite(value)) return value;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

namespace detail {

template <typename T>
void check_matrix_pointer(const char* op, const T* pointer, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) {
    ::cuda_emulation::fail(std::string(op) + ": pointer not 32-byte aligned");
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    ::cuda_emulation::fail(std::string(op) + ": ldm = " + std::to_string(ldm) + " not a multiple of 16 bytes");
  }
}

// Whether every element of a tf32 fragment has zero in the 13 bits below tf32's mantissa.
template <typename Fragment>
bool tf32_only(const Fragment& fragment) {
  for (const float value : fragment.x) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x1fffu) != 0 && std::isfinite(value)) return false;
  }
  return true;
}

// Every lane passed the same pointer and ldm (the operation is warp-wide).
inline void check_uniform(const char* op, int buffer) {
  const auto& arguments = ::cuda_emulation::my_warp().arguments[buffer];
  for (int l = 1; l < ::cuda_emulation::kWarpSize; ++l) {
    if (arguments[l][0] != arguments[0][0] || arguments[l][1] != arguments[0][1]) {
      ::cuda_emulation::fail(std::string(op) + ": lanes passed different pointers or ldm");
    }
  }
}

template <typename Fragment, typename T>
void load(const char* op, ::cuda_emulation::Site site, Fragment& fragment, const T* pointer, unsigned ldm,
          bool row_major) {
  check_matrix_pointer(op, pointer, ldm);
  const int buffer = ::cuda_emulation::sync_warp(site, op, 0xffffffffu, pointer,
                                                 reinterpret_cast<const void*>(static_cast<uintptr_t>(ldm)));
  check_uniform(op, buffer);
  for (int r = 0; r < Fragment::kRows; ++r) {
    for (int c = 0; c < Fragment::kCols; ++c) {
      const T value = row_major ? pointer[r * ldm + c] : pointer[c * ldm + r];
      fragment.x[r * Fragment::kCols + c] = static_cast<typename Fragment::element_type>(value);
    }
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync_at(::cuda_emulation::Site site, fragment<Use, M, N, K, T, Layout>& f, const P* pointer,
                         unsigned ldm) {
  detail::load("load_matrix_sync", site, f, pointer, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K, typename T>
void load_matrix_sync_at(::cuda_emulation::Site site, fragment<accumulator, M, N, K, T>& f, const float* pointer,
                         unsigned ldm, layout_t layout) {
  detail::load("load_matrix_sync", site, f, pointer, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T>
void store_matrix_sync_at(::cuda_emulation::Site site, float* pointer, const fragment<accumulator, M, N, K, T>& f,
                          unsigned ldm, layout_t layout) {
  detail::check_matrix_pointer("store_matrix_sync", pointer, ldm);
  const int buffer = ::cuda_emulation::sync_warp(site, "store_matrix_sync", 0xffffffffu, pointer,
                                                 reinterpret_cast<const void*>(static_cast<uintptr_t>(ldm)));
  detail::check_uniform("store_matrix_sync", buffer);
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      pointer[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
    }
  }
}

template <typename Fragment>
void fill_fragment(Fragment& f, float value) {
  for (auto& element : f.x) element = static_cast<typename Fragment::element_type>(value);
}

// d = a @ b + c, each product added in fp32 in k order (tensor cores add several products at
// once and may round differently: the last bits of a sum can differ). Computed once per warp,
// by the first lane to resume, from lane 0's operands, after checking every lane holds the
// same ones; copied to every lane's d. tf32 operands must come from __float_to_tf32 (the
// hardware reads only their tf32 bits: an unconverted operand would be more exact here).
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC>
void mma_sync_at(::cuda_emulation::Site site, fragment<accumulator, M, N, K, TC>& d,
                 const fragment<matrix_a, M, N, K, TA, LA>& a, const fragment<matrix_b, M, N, K, TA, LB>& b,
                 const fragment<accumulator, M, N, K, TC>& c) {
  using Acc = fragment<accumulator, M, N, K, TC>;
  using A = fragment<matrix_a, M, N, K, TA, LA>;
  using B = fragment<matrix_b, M, N, K, TA, LB>;
  const int buffer = ::cuda_emulation::sync_warp(site, "mma_sync", 0xffffffffu, &d, &a, &b, &c);
  auto& warp = ::cuda_emulation::my_warp();
  if (warp.computed[buffer]) return;
  warp.computed[buffer] = true;
  const auto& lanes = warp.arguments[buffer];
  const A& a0 = *static_cast<const A*>(lanes[0][1]);
  const B& b0 = *static_cast<const B*>(lanes[0][2]);
  const Acc& c0 = *static_cast<const Acc*>(lanes[0][3]);
  for (int l = 1; l < ::cuda_emulation::kWarpSize; ++l) {
    if (std::memcmp(lanes[l][1], &a0, sizeof(A)) != 0 || std::memcmp(lanes[l][2], &b0, sizeof(B)) != 0 ||
        std::memcmp(lanes[l][3], &c0, sizeof(Acc)) != 0) {
      ::cuda_emulation::fail("mma_sync: lanes hold different operands");
    }
  }
  if constexpr (std::is_same_v<TA, precision::tf32>) {
    if (!detail::tf32_only(a0) || !detail::tf32_only(b0)) {
      ::cuda_emulation::fail("mma_sync: a tf32 operand was not converted with __float_to_tf32");
    }
  }
  Acc result;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float sum = c0.x[m * N + n];
      for (int k = 0; k < K; ++k) {
        sum += static_cast<float>(a0.x[m * K + k]) * static_cast<float>(b0.x[k * N + n]);
      }
      result.x[m * N + n] = sum;
    }
  }
  for (int l = 0; l < ::cuda_emulation::kWarpSize; ++l) *static_cast<Acc*>(const_cast<void*>(lanes[l][0])) = result;
}

}  // namespace nvcuda::wmma

#define load_matrix_sync(...) load_matrix_sync_at(::cuda_emulation::Site{__FILE__, __LINE__}, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(::cuda_emulation::Site{__FILE__, __LINE__}, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(::cuda_emulation::Site{__FILE__, __LINE__}, __VA_ARGS__)
