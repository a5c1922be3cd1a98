// The cp.async primitives of cuda_pipeline_primitives.h for cuda_emulation.h.
//
// A copy reads its source when issued and lands in shared memory when the issuing thread's
// __pipeline_wait_prior retires its group, so a thread that reads the destination before that
// wait (or before the barrier that follows the other threads' waits) sees what was there: the
// poison, or an older chunk. In schedule 1 every copy lands as it is issued instead, and in
// random schedules each copy lands at one of the two points at random, so that a copy into a
// buffer other threads are still reading shows as well. A thread that ends with a copy no wait
// retired is reported (in index order, where every copy waits for its wait).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "scheduler.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill = 0) {
  using namespace cuda_emulation;
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) {
    fail("__pipeline_memcpy_async: size " + std::to_string(size_and_align) + " is not 4, 8 or 16");
  }
  if (zfill > size_and_align) fail("__pipeline_memcpy_async: zfill above the copy size");
  if (reinterpret_cast<uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src_global) % size_and_align != 0) {
    fail("__pipeline_memcpy_async: pointer not aligned to the copy size");
  }
  if (!is_shared(dst_shared, size_and_align)) fail("__pipeline_memcpy_async: the destination is not shared memory");
  Fiber& fiber = self();
  AsyncCopy copy{dst_shared, {}, size_and_align, fiber.async_groups};
  const size_t read = size_and_align - zfill;  // zfill bytes at the end are zeros, not read
  std::memcpy(copy.bytes, src_global, read);
  std::memset(copy.bytes + read, 0, zfill);
  const bool lands_now = schedule_seed == 1 || (schedule_seed > 1 && landing_random() % 2 == 0);
  if (lands_now) {
    std::memcpy(dst_shared, copy.bytes, size_and_align);
  } else {
    fiber.async_copies.push_back(copy);
  }
}

inline void __pipeline_commit() {
  ++cuda_emulation::self().async_groups;
}

// Lands every copy of the committed groups but the newest `prior` (copies not yet committed stay).
inline void __pipeline_wait_prior(size_t prior) {
  cuda_emulation::Fiber& fiber = cuda_emulation::self();
  const uint64_t retired = fiber.async_groups > prior ? fiber.async_groups - prior : 0;  // groups [0, retired)
  auto& copies = fiber.async_copies;
  size_t kept = 0;
  for (auto& copy : copies) {
    if (copy.group < retired) {
      std::memcpy(copy.dst, copy.bytes, copy.size);
    } else {
      copies[kept++] = copy;
    }
  }
  copies.resize(kept);
}
