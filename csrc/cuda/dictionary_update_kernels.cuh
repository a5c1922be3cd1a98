// CUDA kernels of cossim_fast::ring_buffer_update: the per-class ring-buffer write of METHOD.md 5.
//
// Semantics (bitwise identical to the PyTorch path in cossim_fast/backends/ring_buffer.py):
// rows are visited in the sequence `order` (None: 0 .. N-1, N = B*P); row i is
// features[i / P, i % P, :]. For class k, the visited rows labelled k (ignore_index and every
// other label skipped) get ranks r = 0, 1, ... in visiting order; n_k = min(count, max_per_class)
// (no cap when max_per_class < 0); ranks with n_k - M <= r < n_k are written to
//   bank[k, (ptr[k] + r) mod M, c] = bank_t(float(features[row, c]) / denom[row])
// (IEEE fp32 division, round-to-nearest-even cast), then ptr[k] = (ptr[k] + n_k) mod M and
// counts[k] = min(M, counts[k] + n_k).
//
// Design: thread blocks (k, s): class k, channel slice s (a few slices per class so that small K
// still fills the GPU; every slice ranks the rows itself, which only costs label reads).
// Pass 1 counts the class's visited rows (block reduction). Pass 2 scans the visit sequence in
// tiles: a block-wide exclusive prefix sum gives each row its rank, the rows of the tile that
// survive go to shared memory, and the block copies its channel slice of them (one warp per
// row, lanes over channels). It stops once the ranks reach n_k. Block (k, 0) records n_k; a
// second tiny kernel then advances ptr[k] and counts[k] (every slice has read ptr[k] by then:
// stream order). Each element of the bank has one writer: no atomics, deterministic, no host
// synchronization.
//
// This header holds the device code and the host code that sizes and launches it, given a
// launcher: dictionary_update.cu launches on the GPU, and the CPU emulation of the CUDA
// execution model (tests/cuda_emulation/) runs the same kernels on CPU tensors when
// COSSIM_FAST_CUDA_EMULATION is defined.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dispatch_floats.h"

// After ATen, as in cosine_similarity_kernels.cuh.
#ifdef COSSIM_FAST_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

namespace cossim_fast::update_kernels {
// Internal linkage, as the kernels of a .cu file of their own (see cosine_similarity_kernels.cuh).
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // visits per thread and tile
constexpr int kTile = kThreads * kItems;

__device__ __forceinline__ int64_t floor_mod(int64_t a, int64_t m) {
  const int64_t r = a % m;
  return r < 0 ? r + m : r;
}

// The row visited at position j, or -1 if it is not a row of class k (or not a valid row index).
__device__ __forceinline__ int64_t class_row(
    const int64_t* __restrict__ labels,
    const int64_t* __restrict__ order,
    int64_t j,
    int64_t num_rows,
    int64_t k,
    int64_t ignore_index) {
  const int64_t row = order != nullptr ? order[j] : j;
  if (row < 0 || row >= num_rows) return -1;
  const int64_t label = labels[row];
  return (label == k && label != ignore_index) ? row : -1;
}

template <typename bank_t, typename feat_t>
__global__ void __launch_bounds__(kThreads) ring_buffer_update_kernel(
    bank_t* __restrict__ bank,
    const int64_t* __restrict__ ptr,
    int64_t* __restrict__ taken_out,
    const feat_t* __restrict__ features,
    int64_t points,
    int64_t stride_b,
    int64_t stride_p,
    int64_t stride_c,
    const int64_t* __restrict__ labels,
    const int64_t* __restrict__ order,
    const float* __restrict__ denom,
    int64_t num_rows,
    int64_t slots,
    int64_t dim,
    int64_t channel_chunk,
    int64_t max_per_class,
    int64_t ignore_index) {
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } temp;
  __shared__ int64_t tile_rows[kTile];  // surviving rows of the current tile, in rank order
  __shared__ int64_t class_count;
  __shared__ int64_t start_ptr;  // ptr[k], read once

  const int64_t k = blockIdx.x;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * channel_chunk;
  const int64_t c_end = c_begin + channel_chunk < dim ? c_begin + channel_chunk : dim;
  const int tid = threadIdx.x;
  if (tid == 0) start_ptr = ptr[k];

  // Pass 1: how many visited rows belong to class k.
  int64_t mine = 0;
  for (int64_t j = tid; j < num_rows; j += kThreads) {
    mine += class_row(labels, order, j, num_rows, k, ignore_index) >= 0 ? 1 : 0;
  }
  const int64_t total = BlockReduce(temp.reduce).Sum(mine);
  if (tid == 0) class_count = total;
  __syncthreads();  // class_count, start_ptr visible; temp free for the scan

  const int64_t count = class_count;
  const int64_t taken = (max_per_class >= 0 && count > max_per_class) ? max_per_class : count;
  const int64_t first_kept = taken > slots ? taken - slots : 0;  // only the last M ranks survive
  const int64_t ptr0 = floor_mod(start_ptr, slots);
  const int warp = tid / 32;
  const int lane = tid % 32;

  // Pass 2: ranks by a block-wide prefix sum over tiles of the visit sequence.
  int64_t base = 0;  // rank of the first class-k row of the tile (uniform across the block)
  for (int64_t start = 0; start < num_rows && base < taken; start += kTile) {
    int64_t rows[kItems];
    int hits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t j = start + static_cast<int64_t>(tid) * kItems + i;  // blocked: keeps visit order
      rows[i] = j < num_rows ? class_row(labels, order, j, num_rows, k, ignore_index) : -1;
      hits += rows[i] >= 0 ? 1 : 0;
    }
    int prefix = 0;
    int tile_hits = 0;
    BlockScan(temp.scan).ExclusiveSum(hits, prefix, tile_hits);

    const int64_t kept_begin = base > first_kept ? base : first_kept;
    const int64_t kept_end = base + tile_hits < taken ? base + tile_hits : taken;
    int64_t rank = base + prefix;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (rows[i] >= 0) {
        if (rank >= kept_begin && rank < kept_end) tile_rows[rank - kept_begin] = rows[i];
        ++rank;
      }
    }
    __syncthreads();  // tile_rows complete

    const int64_t kept = kept_end - kept_begin;  // may be <= 0
    for (int64_t w = warp; w < kept; w += kWarps) {
      const int64_t row = tile_rows[w];
      const int64_t slot = (ptr0 + kept_begin + w) % slots;
      const feat_t* src = features + (row / points) * stride_b + (row % points) * stride_p;
      bank_t* dst = bank + (k * slots + slot) * dim;
      const float d = denom[row];
      for (int64_t c = c_begin + lane; c < c_end; c += 32) {
        dst[c] = static_cast<bank_t>(static_cast<float>(src[c * stride_c]) / d);
      }
    }
    base += tile_hits;
    __syncthreads();  // tile_rows and temp are reused by the next tile
  }

  if (tid == 0 && blockIdx.y == 0) taken_out[k] = taken;
}

// ptr[k] = (ptr[k] + n_k) mod M, counts[k] = min(M, counts[k] + n_k), after the copy kernel.
__global__ void advance_kernel(
    int64_t* __restrict__ counts,
    int64_t* __restrict__ ptr,
    const int64_t* __restrict__ taken,
    int64_t num_classes,
    int64_t slots) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < num_classes;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ptr[k] = (floor_mod(ptr[k], slots) + taken[k]) % slots;
    const int64_t filled = counts[k] + taken[k];
    counts[k] = filled < slots ? filled : slots;
  }
}

// --------------------------------------------------------------------------------------------
// Host side, shared by the GPU op and the emulation: size the grid and launch. Arguments are
// checked by the caller. `launch(kernel, grid, threads, args...)` runs `kernel(args...)`.

constexpr int kAdvanceThreads = 256;

// `multiprocessors`: of the device, to size the channel slices (about two blocks per SM).
template <typename Launch>
void ring_buffer_update(
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& ptr,
    const at::Tensor& features,
    const at::Tensor& labels,
    const std::optional<at::Tensor>& order,
    const at::Tensor& denom,
    int64_t max_per_class,
    int64_t ignore_index,
    int64_t multiprocessors,
    const Launch& launch) {
  if (labels.numel() == 0 || bank.size(0) == 0) return;  // nothing visited / no class: no-op
  const int64_t num_classes = bank.size(0);
  const int64_t dim = bank.size(2);

  // Channel slices per class: enough blocks for about two per SM, slices of >= 32 channels.
  const int64_t wanted = (2 * multiprocessors + num_classes - 1) / num_classes;
  const int64_t max_slices = std::max<int64_t>(1, std::min<int64_t>((dim + 31) / 32, 65535));
  const int64_t slices_wanted = std::max<int64_t>(1, std::min(wanted, max_slices));
  const int64_t channel_chunk = std::max<int64_t>(1, ((dim + slices_wanted - 1) / slices_wanted + 31) / 32 * 32);
  const auto slices = static_cast<unsigned int>(std::max<int64_t>(1, (dim + channel_chunk - 1) / channel_chunk));

  const at::Tensor taken = at::empty({num_classes}, counts.options());  // n_k, no host sync
  const bool has_order = order.has_value() && order->defined();
  COSSIM_FAST_DISPATCH_FLOATS(bank.scalar_type(), "ring_buffer_update(bank)", [&] {
    using bank_t = scalar_t;
    COSSIM_FAST_DISPATCH_FLOATS(features.scalar_type(), "ring_buffer_update(features)", [&] {
      launch(
          ring_buffer_update_kernel<bank_t, scalar_t>,
          dim3(static_cast<unsigned int>(num_classes), slices),
          kThreads,
          bank.data_ptr<bank_t>(),
          ptr.const_data_ptr<int64_t>(),
          taken.data_ptr<int64_t>(),
          features.const_data_ptr<scalar_t>(),
          features.size(1),
          features.stride(0),
          features.stride(1),
          features.stride(2),
          labels.const_data_ptr<int64_t>(),
          has_order ? order->const_data_ptr<int64_t>() : nullptr,
          denom.const_data_ptr<float>(),
          labels.numel(),
          bank.size(1),
          dim,
          channel_chunk,
          max_per_class,
          ignore_index);
    });
  });
  launch(
      advance_kernel,
      dim3(static_cast<unsigned int>(std::min<int64_t>((num_classes + kAdvanceThreads - 1) / kAdvanceThreads, 65535))),
      kAdvanceThreads,
      counts.data_ptr<int64_t>(),
      ptr.data_ptr<int64_t>(),
      taken.const_data_ptr<int64_t>(),
      num_classes,
      bank.size(1));
}

}  // namespace
}  // namespace cossim_fast::update_kernels
