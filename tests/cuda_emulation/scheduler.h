// The execution model of cuda_emulation.h: thread blocks one at a time, each CUDA thread a
// fiber (ucontext) on the calling OS thread, switched only at synchronization points, which are
// checked as CUDA requires. See cuda_emulation.h for what is and is not emulated.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "shared_memory.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};
// The running thread's index and its block's, set by the scheduler before it switches to a
// fiber, and the launch's sizes (1-D blocks, 1-D or 2-D grids). One launch runs at a time.
inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

// A synchronization point in the kernel source.
struct Site {
  const char* file = "";
  int line = 0;

  bool operator==(const Site& other) const { return line == other.line && std::strcmp(file, other.file) == 0; }
  bool operator!=(const Site& other) const { return !(*this == other); }
  std::string str() const {
    const char* name = std::strrchr(file, '/');
    return std::string(name != nullptr ? name + 1 : file) + ":" + std::to_string(line);
  }
};

enum class Wait { kRunnable, kBlock, kWarp, kDone };

// A cp.async copy that has not landed in shared memory yet (pipeline.h): its source bytes, read
// when it was issued, and the commit group it belongs to.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
  size_t size;
  uint64_t group;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kRunnable;
  Site site;                   // the synchronization point it waits at
  void* fake_stack = nullptr;  // AddressSanitizer's state of this stack while switched away
  std::vector<AsyncCopy> async_copies;  // issued, not landed, in issue order
  uint64_t async_groups = 0;            // cp.async groups committed
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
  uint64_t generation = 0;  // of the block barrier (__syncthreads and block collectives)
  int predicate_or[2] = {0, 0};
  std::vector<int64_t> exchange[2];                    // each thread's input to a block collective (cub)
  std::map<const void*, uint64_t> collective_storage;  // cub TempStorage -> generation of last use
  std::function<void()> body;
  std::string error;
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
    message << what << " (block " << blockIdx.x << "," << blockIdx.y << ", thread " << threadIdx.x << ")";
    running->error = message.str();
  }
  self().wait = Wait::kDone;
  switch_to_scheduler(true);
  std::abort();  // never resumed
}

inline void wait_at(Wait what, Site site) {
  Fiber& fiber = self();
  fiber.wait = what;
  fiber.site = site;
  switch_to_scheduler(false);
}

inline void sync_block(Site site) {
  wait_at(Wait::kBlock, site);
}

inline int sync_block_or(Site site, int predicate) {
  const int buffer = static_cast<int>(running->generation % 2);
  running->predicate_or[buffer] |= predicate != 0;
  wait_at(Wait::kBlock, site);
  return running->predicate_or[buffer];
}

// A block collective (cub's BlockReduce, BlockScan) on `storage`: every thread hands in `value`
// and, once the whole block is there, gets every thread's value, in thread order. As cub
// requires, a __syncthreads must separate two collectives on the same storage.
inline const std::vector<int64_t>& block_collective(Site site, const void* storage, int64_t value) {
  Block& block = *running;
  const auto last = block.collective_storage.find(storage);
  if (last != block.collective_storage.end() && last->second + 1 == block.generation) {
    fail("cub TempStorage reused at " + site.str() + " without a __syncthreads since its last collective");
  }
  block.collective_storage[storage] = block.generation;
  const int buffer = static_cast<int>(block.generation % 2);
  block.exchange[buffer][threadIdx.x] = value;
  wait_at(Wait::kBlock, site);
  return running->exchange[buffer];
}

// Waits until all 32 lanes reach this warp operation; returns the generation's buffer index.
inline int sync_warp(Site site, const char* op, unsigned mask, const void* a = nullptr, const void* b = nullptr,
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
T shfl_xor(Site site, unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a register-sized value");
  if (lane_mask < 0 || lane_mask >= kWarpSize) fail("__shfl_xor_sync: a lane mask outside [0, 32) is not emulated");
  Warp& warp = my_warp();
  const int buffer = static_cast<int>(warp.generation % 2);
  std::memcpy(warp.slots[buffer][lane()], &value, sizeof(T));
  sync_warp(site, "__shfl_xor_sync", mask);
  T out;
  std::memcpy(&out, warp.slots[buffer][lane() ^ lane_mask], sizeof(T));
  return out;
}

[[noreturn]] inline void trap(Site site) {
  fail("__trap() at " + site.str());
}

inline void fiber_main() {
  finish_switch(nullptr, &running->scheduler_stack, &running->scheduler_stack_size);
  std::string thrown;
  try {
    running->body();
  } catch (const std::exception& e) {
    thrown = e.what();
  }
  if (!thrown.empty()) fail("exception in a kernel thread: " + thrown);
  if (!self().async_copies.empty()) fail("a thread exited with cp.async copies that no __pipeline_wait_prior retired");
  self().wait = Wait::kDone;
  switch_to_scheduler(true);
}

// Releases every warp whose 32 lanes all wait at one warp operation; returns whether it released
// any. `stuck`: no thread can run, so a warp operation that cannot complete is an error.
inline bool release_warps(Block& block, bool stuck) {
  bool released = false;
  for (size_t w = 0; w < block.warps.size(); ++w) {
    int waiting = 0, live = 0;
    Site site;
    bool same_site = true;
    for (size_t t = w * kWarpSize; t < std::min(block.fibers.size(), (w + 1) * kWarpSize); ++t) {
      const Fiber& fiber = block.fibers[t];
      if (fiber.wait == Wait::kDone) continue;
      ++live;
      if (fiber.wait != Wait::kWarp) continue;
      same_site = same_site && (waiting == 0 || site == fiber.site);
      site = fiber.site;
      ++waiting;
    }
    if (waiting == 0) continue;
    if (live != kWarpSize && stuck) {
      block.error = "warp " + std::to_string(w) + ": a warp-wide operation (" + site.str() + ") reached by " +
                    std::to_string(live) + " live lanes of 32";
      return false;
    }
    if (waiting < kWarpSize) continue;  // the others first reach a block barrier: a deadlock unless they come
    if (!same_site) {
      block.error = "warp " + std::to_string(w) + ": lanes wait at different warp operations";
      return false;
    }
    for (size_t t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) block.fibers[t].wait = Wait::kRunnable;
    ++block.warps[w].generation;
    released = true;
  }
  return released;
}

// Releases the block barrier if every thread waits at one, else records why the block is stuck.
inline bool release_block(Block& block) {
  int live = 0, waiting = 0;
  Site site, other_site;
  bool same_site = true;
  for (const Fiber& fiber : block.fibers) {
    if (fiber.wait == Wait::kDone) continue;
    ++live;
    if (fiber.wait != Wait::kBlock) continue;
    if (waiting > 0 && fiber.site != site) {
      same_site = false;
      other_site = fiber.site;
    }
    if (waiting == 0) site = fiber.site;
    ++waiting;
  }
  if (waiting > 0 && waiting == live && live == static_cast<int>(block.fibers.size()) && same_site) {
    for (Fiber& fiber : block.fibers) fiber.wait = Wait::kRunnable;
    block.predicate_or[(block.generation + 1) % 2] = 0;
    ++block.generation;
    return true;
  }
  std::ostringstream message;
  if (!same_site) {
    message << "threads wait at different __syncthreads or block collectives (" << site.str() << " and "
            << other_site.str() << ")";
  } else if (waiting > 0 && live < static_cast<int>(block.fibers.size())) {
    message << "__syncthreads at " << site.str() << " after " << block.fibers.size() - live
            << " threads of the block exited";
  } else {
    message << "deadlock: " << waiting << " of " << live << " live threads wait at __syncthreads (" << site.str()
            << "), the others at warp operations that not all lanes reach";
  }
  block.error = message.str();
  return false;
}

// Releases what can go on: warps, and (when no thread can run) the block barrier. Returns
// whether anything was released; false when stuck means an error, recorded in the block.
inline bool release(Block& block, bool stuck) {
  if (release_warps(block, stuck)) return true;
  return stuck && block.error.empty() && release_block(block);
}

// The order in which blocks and threads run: 0 the blocks in index order, and the threads of a
// block in rounds in index order, each to its next synchronization point; 1 the same reversed;
// any other value, drawn from that seed: the blocks in a random order, and in each block the
// warps in a random order of priority (redrawn at every block barrier), one runnable thread at
// a time, a random lane of the first warp that has one, each warp released as soon as its lanes
// are all there, so that a warp runs ahead of the others up to the next block barrier.
// Race-free kernels give the same bits in every order. Threads never interleave between two
// synchronization points, so only races across them can show.
inline uint64_t schedule_seed = 0;
inline std::mt19937_64 landing_random;  // when random schedules land cp.async copies (pipeline.h)

inline void set_schedule(uint64_t seed) {
  schedule_seed = seed;
}

inline void run_fiber(Block& block, int t) {
  block.current = t;
  threadIdx.x = static_cast<unsigned int>(t);
  start_switch(&block.scheduler_fake_stack, block.fibers[t].stack.get(), kStackBytes);
  swapcontext(&block.scheduler, &block.fibers[t].context);
  finish_switch(block.scheduler_fake_stack, nullptr, nullptr);
}

// Runs `body` as `threads` CUDA threads of block `index`; throws std::runtime_error on misuse.
inline void run_block(dim3 index, int threads, const std::function<void()>& body, std::mt19937_64& random) {
  Block block;
  block.fibers.resize(threads);
  block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  block.exchange[0].resize(threads);
  block.exchange[1].resize(threads);
  block.body = body;
  running = &block;
  blockIdx = index;
  poison_shared_memory();
  for (Fiber& fiber : block.fibers) {
    fiber.stack.reset(new char[kStackBytes]);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    makecontext(&fiber.context, fiber_main, 0);
  }
  std::vector<int> runnable;
  std::vector<int> warp_priority;  // random mode: rank of each warp
  uint64_t priority_generation = 0;
  while (block.error.empty()) {
    runnable.clear();
    for (int t = 0; t < threads; ++t) {
      if (block.fibers[t].wait == Wait::kRunnable) runnable.push_back(t);
    }
    if (runnable.empty()) {
      const bool all_done = std::all_of(block.fibers.begin(), block.fibers.end(),
                                        [](const Fiber& fiber) { return fiber.wait == Wait::kDone; });
      if (all_done || !release(block, true)) break;
    } else if (schedule_seed <= 1) {
      if (schedule_seed == 1) std::reverse(runnable.begin(), runnable.end());
      for (const int t : runnable) {
        if (!block.error.empty()) break;
        run_fiber(block, t);
      }
    } else {
      if (warp_priority.empty() || block.generation != priority_generation) {
        warp_priority.resize(block.warps.size());
        std::iota(warp_priority.begin(), warp_priority.end(), 0);
        std::shuffle(warp_priority.begin(), warp_priority.end(), random);
        priority_generation = block.generation;
      }
      int first = static_cast<int>(block.warps.size());  // the runnable threads' best warp rank
      for (const int t : runnable) first = std::min(first, warp_priority[t / kWarpSize]);
      std::vector<int> lanes;
      for (const int t : runnable) {
        if (warp_priority[t / kWarpSize] == first) lanes.push_back(t);
      }
      run_fiber(block, lanes[std::uniform_int_distribution<size_t>(0, lanes.size() - 1)(random)]);
      if (block.error.empty()) release(block, false);
    }
  }
  running = nullptr;
  if (!block.error.empty()) throw std::runtime_error("CUDA emulation: " + block.error);
}

// kernel<<<grid, threads>>>(...): the blocks one at a time, each to completion, in the
// schedule's order. The launch limits of CUDA are checked.
inline void launch(dim3 grid, int threads, const std::function<void()>& body) {
  static std::mutex one_launch_at_a_time;
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 ||
      grid.z != 1) {
    std::ostringstream message;
    message << "CUDA emulation: invalid launch configuration: grid (" << grid.x << ", " << grid.y << ", " << grid.z
            << "), " << threads << " threads per block (z must be 1: 3-D grids are not emulated)";
    throw std::invalid_argument(message.str());
  }
  std::mt19937_64 random(schedule_seed);
  landing_random.seed(schedule_seed);
  std::vector<int64_t> order(static_cast<int64_t>(grid.x) * grid.y);
  std::iota(order.begin(), order.end(), 0);
  if (schedule_seed == 1) std::reverse(order.begin(), order.end());
  if (schedule_seed > 1) std::shuffle(order.begin(), order.end(), random);
  gridDim = grid;
  blockDim = dim3(static_cast<unsigned int>(threads));
  for (const int64_t b : order) {
    run_block(dim3(static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>(b / grid.x), 0), threads, body,
              random);
  }
}

}  // namespace cuda_emulation
