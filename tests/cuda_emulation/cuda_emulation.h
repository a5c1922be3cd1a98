// The CUDA execution model on the CPU, for testing the logic of CUDA kernels without a GPU.
//
// Included instead of the CUDA headers when COSSIM_FAST_CUDA_EMULATION is defined. It runs a
// kernel's thread blocks one after another, each CUDA thread a fiber on one OS thread, switched
// only at synchronization points (scheduler.h), which are checked as CUDA requires:
//   - __syncthreads, __syncthreads_or and cub's block collectives (cub.h): every thread of the
//     block at the same call site (a thread that exited, or one waiting elsewhere, is reported);
//   - __shfl_xor_sync and the WMMA operations (wmma.h): all 32 lanes of the warp, full mask,
//     one call site, warp-uniform WMMA arguments, aligned as the Programming Guide requires;
//   - cp.async copies (pipeline.h): aligned, into shared memory, and retired by a wait before
//     the thread ends; a copy lands at that wait, or earlier in some schedules;
//   - the launch limits of CUDA.
// A violation, or a deadlock, stops the launch with an exception that names it.
//
// Races show only as results that depend on the order in which threads and blocks run
// (set_schedule): threads never interleave between two synchronization points. Shared memory
// is filled with 0xff bytes (NaN, -1) before every block (shared_memory.h), so reads of what
// the block did not write stand out. Not emulated: timing, how tensor cores round sums, memory
// errors (the tests' AddressSanitizer build reports out-of-bounds accesses and UBSan misaligned
// vector accesses; compute-sanitizer on a GPU), and instructions this project's kernels do not
// use.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#if defined(__SANITIZE_ADDRESS__)
// GCC's AddressSanitizer leaves globals aligned to more than 64 bytes unprotected: at most 32
// here (what WMMA needs), so that the kernels' 128-byte aligned shared arrays are protected.
#define __align__(n) __attribute__((aligned((n) < 32 ? (n) : 32)))
#else
#define __align__(n) __attribute__((aligned(n)))
#endif
// A function-local static, found and poisoned before every block by shared_memory.h.
#define __shared__ static

#include "scheduler.h"

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

#define COSSIM_FAST_EMULATION_SITE \
  ::cuda_emulation::Site {         \
    __FILE__, __LINE__             \
  }
#define __syncthreads() ::cuda_emulation::sync_block(COSSIM_FAST_EMULATION_SITE)
#define __syncthreads_or(predicate) ::cuda_emulation::sync_block_or(COSSIM_FAST_EMULATION_SITE, (predicate))
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::cuda_emulation::shfl_xor(COSSIM_FAST_EMULATION_SITE, (mask), (value), (lane_mask))
#define __trap() ::cuda_emulation::trap(COSSIM_FAST_EMULATION_SITE)

#include "cub.h"
#include "pipeline.h"
#include "wmma.h"
