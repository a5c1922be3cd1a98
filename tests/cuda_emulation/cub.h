// cub for cuda_emulation.h: the block-wide reduction and scan the kernels use, on integers.
// Each call is a block collective, checked like __syncthreads (the whole block, one call site);
// as cub requires, the block size must be the template's, and a __syncthreads must separate
// two collectives on the same TempStorage. Like cub's, Sum's result is defined in thread 0
// only: the others get the type's lowest value, so a kernel that reads it elsewhere goes wrong
// here too.
#pragma once

#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>

#include "scheduler.h"

namespace cub {
namespace detail {

inline void check_block_size(const char* collective, int threads) {
  if (static_cast<int>(blockDim.x) != threads) {
    ::cuda_emulation::fail(std::string(collective) + " for " + std::to_string(threads) + " threads in a block of " +
                           std::to_string(blockDim.x));
  }
}

}  // namespace detail

template <typename T, int kThreads>
class BlockReduce {
  static_assert(std::is_integral_v<T>, "the emulation reduces integers");

 public:
  struct TempStorage {};
  explicit BlockReduce(TempStorage& storage) : storage_(&storage) { detail::check_block_size("BlockReduce", kThreads); }
  T Sum(T input, ::cuda_emulation::Site site = {__builtin_FILE(), __builtin_LINE()}) {
    const auto& values = ::cuda_emulation::block_collective(site, storage_, static_cast<int64_t>(input));
    if (threadIdx.x != 0) return std::numeric_limits<T>::lowest();
    return static_cast<T>(std::accumulate(values.begin(), values.end(), int64_t{0}));
  }

 private:
  const void* storage_;
};

template <typename T, int kThreads>
class BlockScan {
  static_assert(std::is_integral_v<T>, "the emulation scans integers");

 public:
  struct TempStorage {};
  explicit BlockScan(TempStorage& storage) : storage_(&storage) { detail::check_block_size("BlockScan", kThreads); }
  void ExclusiveSum(T input, T& output, T& block_aggregate,
                    ::cuda_emulation::Site site = {__builtin_FILE(), __builtin_LINE()}) {
    const auto& values = ::cuda_emulation::block_collective(site, storage_, static_cast<int64_t>(input));
    output = static_cast<T>(std::accumulate(values.begin(), values.begin() + threadIdx.x, int64_t{0}));
    block_aggregate = static_cast<T>(std::accumulate(values.begin(), values.end(), int64_t{0}));
  }

 private:
  const void* storage_;
};

}  // namespace cub
