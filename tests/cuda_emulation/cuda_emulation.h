// The CUDA execution model on the CPU, for testing the logic of CUDA kernels without a GPU.
//
// Included instead of the CUDA headers when COSSIM_FAST_CUDA_EMULATION is defined, it runs a
// kernel's thread blocks one after another, each CUDA thread as a fiber (ucontext) on one OS
// thread, switched only at the synchronization points. That makes a run deterministic, and
// lets every synchronization point be checked as CUDA requires it:
//   - __syncthreads / __syncthreads_or: every live thread of the block waits at the same call
//     site (a thread that exited, or one waiting at another site, is reported);
//   - __shfl_xor_sync and the WMMA operations: all 32 lanes of the warp, full mask, at the
//     same call site; WMMA pointers and leading dimensions uniform over the warp, pointers
//     32-byte aligned, leading dimensions multiples of 16 bytes (the CUDA Programming Guide's
//     requirements for load/store_matrix_sync).
// A violation, or a deadlock, stops the launch with an exception that names it.
//
// WMMA fragments hold the whole tile in every lane (the real distribution over lanes is
// opaque to kernels that use only the WMMA API, as ours do); mma_sync accumulates in fp32 in
// a fixed order, so results differ from tensor cores only by summation order.
//
// Races show only as results that change with the order in which threads run between barriers
// and blocks run (set_schedule: in order, reversed, random); threads never interleave between
// two synchronization points. Not emulated: timing, memory errors (the tests' AddressSanitizer
// build sees out-of-bounds accesses; compute-sanitizer on a GPU), and instructions this
// project's kernels do not use. Shared memory persists between blocks.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};
// The running thread's index and its block's, set by the scheduler before it switches to a
// fiber; the launch's sizes (z is always 1: the kernels use 1-D blocks and 1-D or 2-D grids).
inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}
inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

// Round-to-nearest fp32 operations that must not be contracted into FMAs: the emulation is
// compiled with -ffp-contract=off, so the plain operators are exactly these.
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}

namespace cuda_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kRunnable, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kRunnable;
  int site = 0;  // source line of the synchronization point it waits at
  void* fake_stack = nullptr;  // AddressSanitizer's state of this stack while switched away
};

// Per warp: what each lane handed to the current warp-wide operation, double-buffered by
// generation (a lane that runs ahead into the next operation writes the other buffer).
struct Warp {
  uint64_t generation = 0;
  unsigned char slots[2][kWarpSize][16];
  const void* arguments[2][kWarpSize][4];
  bool computed[2] = {false, false};
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  int current = -1;
  uint64_t generation = 0;  // of the block barrier
  int predicate_or[2] = {0, 0};
  std::function<void()> body;
  std::string error;
  std::vector<int64_t> exchange[2];  // each thread's input to a block-wide collective (cub)
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, for AddressSanitizer
  size_t scheduler_stack_size = 0;
};

inline Block* running = nullptr;

// Stack switches, announced to AddressSanitizer when it is compiled in (the tests build a
// variant with -fsanitize=address, so that the kernels' out-of-bounds accesses of global and
// shared memory are reported): without the announcements it would misread the fiber stacks.
// `save` is where the stack being left keeps its state, nullptr when it is left for good.
inline void start_switch(void** save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

// On arrival: `save` is what this stack kept when it was left; records the stack just left.
inline void finish_switch(void* save, const void** left_bottom, size_t* left_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(save, left_bottom, left_size);
#else
  (void)save, (void)left_bottom, (void)left_size;
#endif
}

// From the running fiber to the scheduler; `for_good` when the fiber will not be resumed.
inline void switch_to_scheduler(bool for_good) {
  Block& block = *running;
  Fiber& fiber = block.fibers[block.current];
  start_switch(for_good ? nullptr : &fiber.fake_stack, block.scheduler_stack, block.scheduler_stack_size);
  swapcontext(&fiber.context, &block.scheduler);
  finish_switch(fiber.fake_stack, &block.scheduler_stack, &block.scheduler_stack_size);
}

inline Fiber& self() {
  return running->fibers[running->current];
}

inline int lane() {
  return static_cast<int>(threadIdx.x) % kWarpSize;
}

inline Warp& my_warp() {
  return running->warps[threadIdx.x / kWarpSize];
}

// Records the first error and leaves the fiber for good: the scheduler stops the block.
[[noreturn]] inline void fail(const std::string& what) {
  if (running->error.empty()) {
    std::ostringstream message;
    message << what << " (block " << blockIdx.x << ", thread " << threadIdx.x << ")";
    running->error = message.str();
  }
  self().wait = Wait::kDone;
  switch_to_scheduler(true);
  std::abort();  // never resumed
}

inline void wait_at(Wait what, int site) {
  Fiber& fiber = self();
  fiber.wait = what;
  fiber.site = site;
  switch_to_scheduler(false);
}

inline void sync_block(int site) {
  wait_at(Wait::kBlock, site);
}

inline int sync_block_or(int site, int predicate) {
  const int buffer = static_cast<int>(running->generation % 2);
  running->predicate_or[buffer] |= predicate != 0;
  wait_at(Wait::kBlock, site);
  return running->predicate_or[buffer];
}

// A block-wide collective (cub's BlockReduce, BlockScan): every thread hands in `value` and,
// once the whole block is there, gets every thread's value, in thread order.
inline const std::vector<int64_t>& block_collective(int site, int64_t value) {
  const int buffer = static_cast<int>(running->generation % 2);
  running->exchange[buffer][threadIdx.x] = value;
  wait_at(Wait::kBlock, site);
  return running->exchange[buffer];
}

// Waits until all 32 lanes reach this warp operation with the same arguments; returns the
// generation's buffer index.
inline int sync_warp(int site, const char* op, unsigned mask, const void* a = nullptr, const void* b = nullptr,
                     const void* c = nullptr, const void* d = nullptr) {
  if (mask != 0xffffffffu) fail(std::string(op) + ": the emulation supports only the full warp mask");
  Warp& warp = my_warp();
  const int buffer = static_cast<int>(warp.generation % 2);
  const void* arguments[4] = {a, b, c, d};
  std::memcpy(warp.arguments[buffer][lane()], arguments, sizeof(arguments));
  warp.computed[buffer] = false;
  wait_at(Wait::kWarp, site);
  return buffer;
}

template <typename T>
T shfl_xor(int site, unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a register-sized value");
  Warp& warp = my_warp();
  const int buffer = static_cast<int>(warp.generation % 2);
  std::memcpy(warp.slots[buffer][lane()], &value, sizeof(T));
  sync_warp(site, "__shfl_xor_sync", mask);
  T out;
  std::memcpy(&out, warp.slots[buffer][(lane() ^ lane_mask) % kWarpSize], sizeof(T));
  return out;
}

[[noreturn]] inline void trap(int site) {
  fail("__trap() at line " + std::to_string(site));
}

inline void fiber_main() {
  finish_switch(nullptr, &running->scheduler_stack, &running->scheduler_stack_size);
  try {
    running->body();
  } catch (const std::exception& e) {
    fail(std::string("exception in a kernel thread: ") + e.what());
  }
  self().wait = Wait::kDone;
  switch_to_scheduler(true);
}

// Releases whatever can go on: a warp whose live lanes all wait at one warp operation, else the
// block barrier when every live thread waits at it. Returns false on a deadlock or misuse.
inline bool release(Block& block) {
  bool released = false;
  for (size_t w = 0; w < block.warps.size(); ++w) {
    int waiting = 0, live = 0, site = -1;
    bool same_site = true;
    for (size_t t = w * kWarpSize; t < std::min(block.fibers.size(), (w + 1) * kWarpSize); ++t) {
      const Fiber& fiber = block.fibers[t];
      if (fiber.wait == Wait::kDone) continue;
      ++live;
      if (fiber.wait != Wait::kWarp) continue;
      ++waiting;
      same_site = same_site && (site < 0 || site == fiber.site);
      site = fiber.site;
    }
    if (waiting == 0) continue;
    if (live != kWarpSize) {
      block.error = "warp " + std::to_string(w) + ": a warp-wide operation (line " + std::to_string(site) +
          ") reached by " + std::to_string(live) + " live lanes of 32";
      return false;
    }
    if (waiting < live) continue;  // the others first reach a block barrier: a deadlock unless they come
    if (!same_site) {
      block.error = "warp " + std::to_string(w) + ": lanes wait at different warp operations";
      return false;
    }
    for (size_t t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) block.fibers[t].wait = Wait::kRunnable;
    ++block.warps[w].generation;
    released = true;
  }
  if (released) return true;

  int live = 0, waiting = 0, site = -1, other_site = -1;
  for (const Fiber& fiber : block.fibers) {
    if (fiber.wait == Wait::kDone) continue;
    ++live;
    if (fiber.wait == Wait::kBlock) {
      ++waiting;
      if (site < 0) site = fiber.site;
      if (fiber.site != site) other_site = fiber.site;
    }
  }
  if (waiting > 0 && waiting == live && live == static_cast<int>(block.fibers.size()) && other_site < 0) {
    for (Fiber& fiber : block.fibers) fiber.wait = Wait::kRunnable;
    block.predicate_or[(block.generation + 1) % 2] = 0;
    ++block.generation;
    return true;
  }
  std::ostringstream message;
  if (other_site >= 0) {
    message << "threads wait at different __syncthreads (lines " << site << " and " << other_site << ")";
  } else if (waiting > 0 && live < static_cast<int>(block.fibers.size())) {
    message << "__syncthreads at line " << site << " after " << block.fibers.size() - live
            << " threads of the block exited";
  } else {
    message << "deadlock: " << waiting << " of " << live << " live threads wait at __syncthreads (line " << site
            << "), the others at warp operations that not all lanes reach";
  }
  block.error = message.str();
  return false;
}

// The order of the blocks of a launch, and of the runnable threads of a block between two
// synchronization points: 0 in index order, 1 reversed, any other value a fresh random order
// each time, drawn from that seed. Kernels without races give the same bits in every order.
inline uint64_t schedule_seed = 0;

inline void set_schedule(uint64_t seed) {
  schedule_seed = seed;
}

// Fills `order` with 0..n-1 in the schedule's order.
inline void schedule(std::vector<int>& order, int n, std::mt19937_64& random) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  if (schedule_seed == 1) std::reverse(order.begin(), order.end());
  if (schedule_seed > 1) std::shuffle(order.begin(), order.end(), random);
}

// Runs `body` as `threads` CUDA threads of block `index`; throws std::runtime_error on misuse.
inline void run_block(dim3 index, int threads, const std::function<void()>& body, std::mt19937_64& random) {
  Block block;
  block.fibers.resize(threads);
  block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  block.body = body;
  running = &block;
  block.exchange[0].resize(threads);
  block.exchange[1].resize(threads);
  blockIdx = index;
  for (Fiber& fiber : block.fibers) {
    fiber.stack.reset(new char[kStackBytes]);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    makecontext(&fiber.context, fiber_main, 0);
  }
  std::vector<int> order;
  while (block.error.empty()) {
    bool all_done = true;
    schedule(order, threads, random);
    for (const int t : order) {
      if (!block.error.empty()) break;
      if (block.fibers[t].wait != Wait::kRunnable) continue;
      block.current = t;
      threadIdx.x = static_cast<unsigned int>(t);
      start_switch(&block.scheduler_fake_stack, block.fibers[t].stack.get(), kStackBytes);
      swapcontext(&block.scheduler, &block.fibers[t].context);
      finish_switch(block.scheduler_fake_stack, nullptr, nullptr);
    }
    for (const Fiber& fiber : block.fibers) all_done = all_done && fiber.wait == Wait::kDone;
    if (all_done || !block.error.empty() || !release(block)) break;
  }
  running = nullptr;
  if (!block.error.empty()) throw std::runtime_error("CUDA emulation: " + block.error);
}

// kernel<<<grid, threads>>>(...): the blocks one at a time, each to completion, in the
// schedule's order.
inline void launch(dim3 grid, int threads, const std::function<void()>& body) {
  if (grid.z != 1) throw std::invalid_argument("CUDA emulation: 3-D grids are not emulated");
  std::mt19937_64 random(schedule_seed);
  std::vector<int> order;
  schedule(order, static_cast<int>(grid.x * grid.y), random);
  gridDim = grid;
  blockDim = dim3(static_cast<unsigned int>(threads));
  for (const int b : order) run_block(dim3(b % grid.x, b / grid.x, 0), threads, body, random);
}

}  // namespace cuda_emulation

#define __syncthreads() ::cuda_emulation::sync_block(__LINE__)
#define __syncthreads_or(predicate) ::cuda_emulation::sync_block_or(__LINE__, (predicate))
#define __shfl_xor_sync(mask, value, lane_mask) ::cuda_emulation::shfl_xor(__LINE__, (mask), (value), (lane_mask))
#define __trap() ::cuda_emulation::trap(__LINE__)

// cub: the block-wide reduction and scan the kernels use, on integers. Each call is a block
// collective (checked like __syncthreads: the whole block, one call site). Like cub, Sum's
// result is defined in thread 0 only: the others get the type's lowest value, so a kernel that
// reads it elsewhere goes wrong here too.
namespace cub {

template <typename T, int kThreads>
class BlockReduce {
  static_assert(std::is_integral_v<T>, "the emulation reduces integers");

 public:
  struct TempStorage {};
  explicit BlockReduce(TempStorage&) {}
  T Sum(T input, int site = __builtin_LINE()) {
    const auto& values = ::cuda_emulation::block_collective(site, static_cast<int64_t>(input));
    if (threadIdx.x != 0) return std::numeric_limits<T>::lowest();
    return static_cast<T>(std::accumulate(values.begin(), values.end(), int64_t{0}));
  }
};

template <typename T, int kThreads>
class BlockScan {
  static_assert(std::is_integral_v<T>, "the emulation scans integers");

 public:
  struct TempStorage {};
  explicit BlockScan(TempStorage&) {}
  void ExclusiveSum(T input, T& output, T& block_aggregate, int site = __builtin_LINE()) {
    const auto& values = ::cuda_emulation::block_collective(site, static_cast<int64_t>(input));
    output = static_cast<T>(std::accumulate(values.begin(), values.begin() + threadIdx.x, int64_t{0}));
    block_aggregate = static_cast<T>(std::accumulate(values.begin(), values.end(), int64_t{0}));
  }
};

}  // namespace cub

// WMMA: the subset of nvcuda::wmma the kernels use, with the whole tile in every lane.
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
void load(const char* op, int site, Fragment& fragment, const T* pointer, unsigned ldm, bool row_major) {
  check_matrix_pointer(op, pointer, ldm);
  const int buffer = ::cuda_emulation::sync_warp(
      site, op, 0xffffffffu, pointer, reinterpret_cast<const void*>(static_cast<uintptr_t>(ldm)));
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
void load_matrix_sync_at(int site, fragment<Use, M, N, K, T, Layout>& f, const P* pointer, unsigned ldm) {
  detail::load("load_matrix_sync", site, f, pointer, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K, typename T>
void load_matrix_sync_at(int site, fragment<accumulator, M, N, K, T>& f, const float* pointer, unsigned ldm,
                         layout_t layout) {
  detail::load("load_matrix_sync", site, f, pointer, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T>
void store_matrix_sync_at(int site, float* pointer, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                          layout_t layout) {
  detail::check_matrix_pointer("store_matrix_sync", pointer, ldm);
  const int buffer = ::cuda_emulation::sync_warp(
      site, "store_matrix_sync", 0xffffffffu, pointer, reinterpret_cast<const void*>(static_cast<uintptr_t>(ldm)));
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

// d = a @ b + c in fp32 (products of 16-bit or tf32 values are exact in fp32). Computed once per
// warp, by the first lane to resume, from lane 0's operands, after checking every lane holds
// the same ones; copied to every lane's d.
template <int M, int N, int K, typename TA, typename LA, typename LB, typename TC>
void mma_sync_at(int site, fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                 const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
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

#define load_matrix_sync(...) load_matrix_sync_at(__LINE__, __VA_ARGS__)
#define store_matrix_sync(...) store_matrix_sync_at(__LINE__, __VA_ARGS__)
#define mma_sync(...) mma_sync_at(__LINE__, __VA_ARGS__)
