// Small kernels that exercise the emulation itself (tests/test_cuda_emulation.py): what it
// computes for shuffles, __syncthreads_or and WMMA, and that each kind of misuse is reported.
// Written as CUDA device code, like the kernels under test.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/ATen.h>

#include "cuda_emulation.h"

namespace self_checks {
namespace {  // internal linkage: AddressSanitizer instruments the __shared__ arrays (see the kernels)

// out[t] = the sum of values over t's warp, by a butterfly of __shfl_xor_sync.
__global__ void warp_sum_kernel(const float* values, float* out) {
  float v = values[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

// out[t] = __syncthreads_or(flags[t]), twice in a row (the second with the flags negated).
__global__ void sync_or_kernel(const int64_t* flags, int64_t* out) {
  out[2 * threadIdx.x] = __syncthreads_or(static_cast<int>(flags[threadIdx.x]));
  out[2 * threadIdx.x + 1] = __syncthreads_or(!flags[threadIdx.x]);
}

// c (16 x 16, fp32) = a (16 x 16 fp16, row-major) @ b, b read as a col-major operand from bt = b^T.
__global__ void wmma_kernel(const __half* a, const __half* bt, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, bt, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// Misuse, one kind per `which` (64 threads).
__global__ void misuse_kernel(int which, const __half* data, const float* floats) {
  const int t = threadIdx.x;
  if (which == 0) {  // __syncthreads in divergent code
    if (t < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (which == 1) {  // a shuffle that half the warp reaches
    if (t >= 16) return;
    __shfl_xor_sync(0xffffffffu, t, 1);
  } else if (which == 2) {  // a barrier after a thread exited
    if (t == 0) return;
    __syncthreads();
  } else if (which == 3) {  // a misaligned WMMA pointer
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::load_matrix_sync(fa, data + 1, 16);
  } else if (which == 4) {  // lanes passing different pointers
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::load_matrix_sync(fa, data + 16 * (t % 2), 16);
  } else if (which == 5) {
    __trap();
  } else if (which == 6) {  // half a warp waits at a shuffle, everyone else at a barrier
    if (t < 16) __shfl_xor_sync(0xffffffffu, t, 1);
    __syncthreads();
  } else if (which == 7) {  // two cub collectives on one TempStorage with no barrier between
    using Reduce = cub::BlockReduce<int64_t, 64>;
    __shared__ typename Reduce::TempStorage storage;
    Reduce(storage).Sum(t);
    Reduce(storage).Sum(t);
  } else if (which == 8) {  // a cub collective for another block size
    using Reduce = cub::BlockReduce<int64_t, 128>;
    __shared__ typename Reduce::TempStorage storage;
    Reduce(storage).Sum(t);
  } else if (which == 9) {  // tf32 operands not converted with __float_to_tf32
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(fa, floats, 8);
    wmma::load_matrix_sync(fb, floats, 8);
    wmma::mma_sync(acc, fa, fb, acc);
  } else if (which == 10) {  // a cp.async copy to an address that is not 16-byte aligned
    __shared__ __align__(16) float buffer[8];
    __pipeline_memcpy_async(buffer + 1, floats, 16);
  } else if (which == 11) {  // a cp.async copy to global memory
    __pipeline_memcpy_async(const_cast<float*>(floats) + 4, floats, 16);
  } else if (which == 12) {  // a cp.async copy that no wait retires
    __shared__ __align__(16) float landing[4];
    __pipeline_memcpy_async(landing, floats, 16);
    __pipeline_commit();
  }
}

// Thread t copies 4 ints, values[4t..4t+3], into its 16 shared bytes by cp.async (odd threads
// zero-fill the last 8 bytes), and reads them back three times: right after the copy, after
// waiting for all but its newest group (the copy's, committed: nothing lands) and after
// waiting for every group. out[t] = those three first ints, and the last int at the end.
__global__ void async_copy_kernel(const int32_t* values, int32_t* out) {
  __shared__ __align__(16) int32_t buffer[4 * 32];
  const int t = threadIdx.x;
  int32_t* mine = buffer + 4 * t;
  __pipeline_memcpy_async(mine, values + 4 * t, 16, t % 2 == 1 ? 8 : 0);
  out[4 * t] = mine[0];
  __pipeline_commit();
  __pipeline_wait_prior(1);
  out[4 * t + 1] = mine[0];
  __pipeline_wait_prior(0);
  out[4 * t + 2] = mine[0];
  out[4 * t + 3] = mine[3];
}

// What a thread reads of shared memory no thread of its block wrote: garbage on a GPU, the
// poison pattern here. A template, as the kernels under test are; the array is written
// elsewhere, or the compiler would read the never-written static as its zero initializer.
template <int N>
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float tile[N];
  if (threadIdx.x == 0) tile[0] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) *out = tile[N - 1];
}

// A 16-byte vector load from an address that is not 16-byte aligned: a fault on a GPU; only
// UBSan sees it here (the tests' sanitizer build).
__global__ void misaligned_vector_kernel(const float* values, float* out) {
  if (threadIdx.x == 0) *out = reinterpret_cast<const float4*>(values + 1)->x;
}

// Reads values[n], one past the end: only AddressSanitizer sees it (the tests' ASan build).
__global__ void read_past_end_kernel(const float* values, int64_t n, float* out) {
  if (threadIdx.x == 0) *out = values[n];
}

// Reads shared memory one past the end of a __shared__ array of a kernel template (as the
// kernels under test are): again only AddressSanitizer sees it.
template <int N>
__global__ void shared_past_end_kernel(int64_t index, float* out) {
  __shared__ float tile[N];
  tile[threadIdx.x % N] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) *out = tile[index];
}

// out[t] = what thread t reads of its neighbour's slot, with the barrier between the write and
// the read missing: the result depends on the order in which the threads run.
__global__ void racy_kernel(int64_t* out) {
  __shared__ int64_t slot[64];
  const int t = threadIdx.x;
  slot[t] = -1;
  __syncthreads();
  slot[t] = t;
  const int64_t neighbour = slot[(t + 1) % 64];
  __syncthreads();
  out[t] = neighbour;
}

// out[t] for the second warp = a flag the first warp sets after two shuffles, with no barrier
// between: 0 unless the first warp runs ahead of the second (random schedules).
__global__ void overtaking_race_kernel(int64_t* out) {
  __shared__ int64_t flag;
  const int t = threadIdx.x;
  if (t == 0) flag = 0;
  __syncthreads();
  int64_t seen = -1;
  if (t < 32) {
    int v = __shfl_xor_sync(0xffffffffu, t, 1);
    v = __shfl_xor_sync(0xffffffffu, v, 2);
    if (t == 0) flag = 1 + v * 0;
  } else {
    seen = flag;
  }
  __syncthreads();
  out[t] = seen;
}

inline at::Tensor warp_sum(const at::Tensor& values) {
  at::Tensor out = at::empty_like(values);
  const float* in = values.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  cuda_emulation::launch(dim3(1), static_cast<int>(values.numel()), [&] { warp_sum_kernel(in, o); });
  return out;
}

inline at::Tensor sync_or(const at::Tensor& flags) {
  at::Tensor out = at::empty({2 * flags.numel()}, flags.options());
  const int64_t* in = flags.const_data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  cuda_emulation::launch(dim3(1), static_cast<int>(flags.numel()), [&] { sync_or_kernel(in, o); });
  return out;
}

inline at::Tensor wmma_matmul(const at::Tensor& a, const at::Tensor& bt) {
  at::Tensor c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const auto* pa = reinterpret_cast<const __half*>(a.const_data_ptr<at::Half>());
  const auto* pb = reinterpret_cast<const __half*>(bt.const_data_ptr<at::Half>());
  float* pc = c.data_ptr<float>();
  cuda_emulation::launch(dim3(1), 32, [&] { wmma_kernel(pa, pb, pc); });
  return c;
}

inline float read_past_end(const at::Tensor& values) {
  float out = 0.0f;
  const float* in = values.const_data_ptr<float>();
  cuda_emulation::launch(dim3(1), 32, [&] { read_past_end_kernel(in, values.numel(), &out); });
  return out;
}

inline float read_shared_past_end(int64_t index) {
  float out = 0.0f;
  cuda_emulation::launch(dim3(1), 32, [&] { shared_past_end_kernel<48>(index, &out); });
  return out;
}

inline at::Tensor racy() {
  at::Tensor out = at::empty({64}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  cuda_emulation::launch(dim3(1), 64, [&] { racy_kernel(o); });
  return out;
}

inline at::Tensor overtaking_race() {
  at::Tensor out = at::empty({64}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  cuda_emulation::launch(dim3(1), 64, [&] { overtaking_race_kernel(o); });
  return out;
}

inline at::Tensor async_copy(const at::Tensor& values) {
  at::Tensor out = at::empty({32, 4}, values.options());
  const int32_t* in = values.const_data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  cuda_emulation::launch(dim3(1), 32, [&] { async_copy_kernel(in, o); });
  return out;
}

// Global memory of the host functions below: at namespace scope, since every function-local
// static here is taken for a __shared__ variable (shared_memory.h).
alignas(32) __half misuse_data[16 * 17];
alignas(32) float misuse_floats[16 * 8];  // 32-byte aligned: the misaligned copy is the destination
alignas(16) float vector_values[8] = {1, 2, 3, 4, 5, 6, 7, 8};

inline void misuse(int which) {
  __half* data = misuse_data;
  float* floats = misuse_floats;
  for (int i = 0; i < 16 * 8; ++i) floats[i] = 1.0f + static_cast<float>(i) / 1000.0f;  // not tf32 values
  cuda_emulation::launch(dim3(1), 64, [&] { misuse_kernel(which, data, floats); });
}

inline float read_unwritten_shared() {
  float out = 0.0f;
  cuda_emulation::launch(dim3(1), 32, [&] { unwritten_shared_kernel<4>(&out); });
  return out;
}

inline float read_misaligned_vector() {
  float out = 0.0f;
  cuda_emulation::launch(dim3(1), 32, [&] { misaligned_vector_kernel(vector_values, &out); });
  return out;
}

// A launch of `threads` threads per block (CUDA allows at most 1024).
inline void launch_threads(int threads) {
  cuda_emulation::launch(dim3(1), threads, [] {});
}

}  // namespace
}  // namespace self_checks
