// The CUDA kernels of the class-bucketed cosine similarity (METHOD.md 3 and 4):
//   cossim_fast::cuda_max_forward   values[i] = max_j S[i, j], indices[i] = argmax_j (lowest j on ties)
//   cossim_fast::cuda_all_forward   per row: count, ssum = sum of S[i, j] > tau, dsum = sum of their bank rows
//   cossim_fast::cuda_max_backward  g_i * (bank[y_i, a_i] - s_i * f^_i) / r_i, zero where a_i == -1
//   cossim_fast::cuda_all_backward  g_i * (dsum_i - ssum_i * f^_i) / r_i
// with S[i, j] = f^_i . bank[y_i, j] for j < counts[y_i], f^ = f / max(||f||, 1e-12).
//
// Forward design. The caller groups the rows by class on the device (cossim_fast/backends/
// schedule.py, `group_by_class`): `rows` = row ids sorted by class, class k's rows at
// rows[bounds[k]:bounds[k + 1]]. Each class's rows are cut into tiles of `tile_rows`, one thread
// block (256 threads, 8 warps) per tile; a small kernel first writes each block's (class, start,
// end) from the class bounds (tile_table_kernel: one thread per block, K steps each), which the
// forward reads (finding it in the forward itself cost registers its 16-bit "all" kernel does
// not have). A block takes the rows rows[start:end] in groups of
// kBlockM = 64 and streams its class's valid slots (counts[k], read at run time, clamped to
// [0, M]) in slot tiles of kBlockN = 64, each a small GEMM over C in chunks of kBlockK = 32
// channels staged through shared memory. The bf16/fp16 kernels pipeline those chunks through a
// ring of 3 ("max") or 2 ("all") buffers: where 16-byte loads are allowed (unit channel stride,
// C % 8 == 0, aligned rows) cp.async copies fill the next buffers while the tensor cores work on
// an earlier chunk, so a chunk costs one barrier and no wait on memory (before, a synchronous
// load-and-barrier round trip per chunk bounded the loop); other 16-bit inputs load
// synchronously into the ring, and the fp32 paths into one buffer:
//   - bf16 / fp16 (features and bank of the same dtype): WMMA 16x16x16 tensor-core tiles, fp32
//     accumulation (every product is exact in fp32);
//   - fp32 with fp32_precision == "tf32": WMMA tf32 16x16x8 tiles (inputs rounded to tf32);
//   - fp32 "ieee" and every mixed feature/bank dtype pair: exact fp32 FMAs on the CUDA cores,
//     4x4 outputs per thread.
// The 64 x 64 raw dot products of a slot tile go to shared memory (fp32), and a common epilogue
// reads them with 4 threads per row (thread q takes slots q, q+4, ...):
//   - "max": each thread keeps its first maximum (strict >), the 4 threads combine by (larger
//     value, then lower slot), and the tile's winner replaces the running one only if strictly
//     larger, so the lowest slot wins every exact tie. Slots past counts[k] are never read (the
//     -inf padding of METHOD.md 5b). Only the winner is scaled by 1 / max(||f_i||, eps), with the
//     row norm computed here in fp32.
//   - "all": S = dot / max(||f_i||, eps); the selection S > tau is counted and summed per thread,
//     and, if any row of the block selected a slot of the tile, dsum[rows] += P @ bank[tile]
//     (P the 0/1 selection), read-modify-written chunk by chunk of C in the (N, C) fp32 output
//     (WMMA for bf16/fp16, exact fp32 otherwise). Each row belongs to one block: no atomics.
// Nothing N x M is ever stored; every reduction has a fixed order, so the results are
// bitwise reproducible. The only global memory besides inputs and outputs is the schedule.
//
// Backward: one warp per row, two passes over C (row norm, then the gradient), elementwise.
//
//
// This header holds the device code and the host code that fills and launches it, given a
// launcher: cosine_similarity.cu launches on the GPU (the ops' CUDA kernels), and the CPU
// emulation of the CUDA execution model (tests/cuda_emulation/) runs the same kernels on CPU
// tensors when COSSIM_FAST_CUDA_EMULATION is defined, so their logic is tested without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../cosine_similarity.h"
#include "dispatch_floats.h"

// After ATen: the emulation's function-like macros (__syncthreads(), mma_sync(...)) are for the
// kernels below only.
#ifdef COSSIM_FAST_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#endif

namespace cossim_fast::kernels {
// Internal linkage, as the kernels of a .cu file of their own (one translation unit includes
// this header). It also lets AddressSanitizer instrument their __shared__ arrays in the
// emulation's test build (GCC leaves function-local statics of shared templates alone).
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockM = 64;  // rows per row group
constexpr int kBlockN = 64;  // slots per slot tile
constexpr int kBlockK = 32;  // channels per chunk (Layout::kChunk), and of the dsum update
constexpr int kLanesPerRow = kThreads / kBlockM;  // epilogue: 4 threads per row
constexpr float kEps = 1e-12f;  // as torch.nn.functional.normalize
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kLanesPerRow == 4, "the epilogue combines 4 lanes per row");
static_assert(kBlockK == 32, "the fp32 dsum update maps one lane per channel of a chunk");
static_assert(kWarps == 8, "the WMMA warp grids below assume 8 warps");

enum class Mode { kMax, kAll };
enum class Path { kTensor16, kTf32, kSimt };

// Shared-memory element type of the dot operands: the 16-bit type itself for the bf16/fp16
// tensor-core path, fp32 otherwise.
template <Path PATH, typename feat_t>
using smem_t = std::conditional_t<PATH == Path::kTensor16, feat_t, float>;

template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int round_up(int x, int to) {
  return (x + to - 1) / to * to;
}

// Shared-memory regions of one block (static, at most 48 KiB in all), one array each, so that an
// overrun from one region into the next is an overrun of an array (AddressSanitizer in the
// tests' emulation reports it).
//   A: feature rows of a chunk, kStages buffers. kTensor16/kTf32: [m][k] (row-major, ld kLdA);
//      kSimt: [k][m].
//   B: bank slots of a chunk, kStages buffers. kTensor16/kTf32: [n][k]; kSimt: [k][n]. The dsum
//      update reuses one as [n][c] (ld kLdBD).
//   S: fp32 [m][n] raw dot products of the slot tile; the fp32 paths overwrite it in place
//      with the 0/1 selection P ("all").
//   P: kTensor16 "all" only: the selection in the 16-bit type, [m][n].
//   D: kTensor16 "all" only: fp32 [m][c] staging of a dsum chunk, in S's bytes (S is spent by then).
template <Mode MODE, Path PATH, typename ST>
struct Layout {
  static constexpr bool kKMajor = PATH == Path::kSimt;
  static constexpr int kChunk = kBlockK;  // channels per chunk of the dot products
  // Chunks in the ring of operand buffers. The 16-bit path copies its operands with cp.async
  // while the tensor cores work on an earlier chunk: 3 stages for "max", 2 for "all" (whose P
  // region leaves room for no more in 48 KiB). The fp32 paths load synchronously into one
  // buffer: their fp32 operands take twice the bytes, so two stages would not fit 48 KiB, and
  // the exact path transposes on the way in.
  static constexpr int kStages = PATH == Path::kTensor16 ? (MODE == Mode::kMax ? 3 : 2) : 1;
  static constexpr int kPad = PATH == Path::kTensor16 ? 8 : 4;  // keeps WMMA/float4 alignment
  static constexpr int kLdA = kKMajor ? kBlockM + 4 : kChunk + kPad;
  static constexpr int kLdB = kKMajor ? kBlockN + 4 : kChunk + kPad;
  static constexpr int kLdBD = kBlockK + kPad;  // [n][c] layout of the dsum update
  static constexpr int kLdS = kBlockN + 4;
  static constexpr int kLdP = kBlockN + 8;
  static constexpr int kLdD = kBlockK + 4;
  static constexpr int kAElems = kKMajor ? kChunk * kLdA : kBlockM * kLdA;
  static constexpr int kBElemsDot = kKMajor ? kChunk * kLdB : kBlockN * kLdB;
  static constexpr int kBElemsSum = MODE == Mode::kAll ? kBlockN * kLdBD : 0;
  static constexpr int kBElems = kBElemsDot > kBElemsSum ? kBElemsDot : kBElemsSum;
  static constexpr bool kHasPD = MODE == Mode::kAll && PATH == Path::kTensor16;
  static constexpr int kABytes = kAElems * static_cast<int>(sizeof(ST));
  static constexpr int kBBytes = kBElems * static_cast<int>(sizeof(ST));
  static constexpr int kSBytes = kBlockM * kLdS * 4;
  static constexpr int kPBytes = kBlockM * kLdP * static_cast<int>(sizeof(ST));  // kHasPD only
  static constexpr int kDBytes = kBlockM * kLdD * 4;  // kHasPD only
  // Each region 128-byte aligned (WMMA needs 32), the two row arrays after them.
  static constexpr int kAStride = round_up(kABytes, 128);  // bytes between two stages' buffers
  static constexpr int kBStride = round_up(kBBytes, 128);
  static constexpr int kBytes =
      kStages * (kAStride + kBStride) + round_up(kSBytes, 128) + (kHasPD ? round_up(kPBytes, 128) : 0);
  static_assert(kBytes + 2 * kBlockM * 8 <= 48 * 1024, "static shared memory above 48 KiB");
  static_assert(!kHasPD || kDBytes <= kSBytes, "D lives in S's bytes");
};

// The P region, declared only by the kernels that use it (kHasPD).
template <typename L>
__device__ __forceinline__ unsigned char* p_region() {
  __shared__ __align__(128) unsigned char bytes[L::kPBytes];
  return bytes;
}

template <typename feat_t, typename bank_t>
struct ForwardParams {
  const feat_t* features;
  int64_t points;  // P: row i is features[i / P, i % P, :]
  int64_t stride_b;
  int64_t stride_p;
  int64_t stride_c;
  int64_t num_rows;  // N = B * P
  int64_t dim;  // C
  const bank_t* bank;  // (K, M, C) contiguous
  int64_t num_classes;
  int64_t slots;
  const int64_t* counts;
  const int64_t* labels;
  const int64_t* rows;  // (N,) row ids sorted by class
  const int64_t* tiles;  // (T, 3): per block its class (-1: none), start and end in rows
  float threshold;
  bool vec_features;  // 16-byte loads allowed (stride_c == 1, aligned rows, C % vec == 0)
  bool vec_bank;
  float* values;  // "max" outputs
  int64_t* indices;
  int64_t* count;  // "all" outputs
  float* ssum;
  float* dsum;  // (N, C) contiguous, zero-initialized
};

// Offsets of the feature rows of the current row group (smem), -1 for no row.
struct GatheredRows {
  const int64_t* offsets;
  __device__ __forceinline__ int64_t operator()(int r) const {
    return offsets[r];
  }
};

// Offsets of the slots of the current slot tile inside the class's bank, -1 past counts[k].
struct SlotRows {
  int64_t first;  // offset of the tile's first slot
  int64_t dim;
  int count;  // valid slots in the tile
  __device__ __forceinline__ int64_t operator()(int r) const {
    return r < count ? first + static_cast<int64_t>(r) * dim : -1;
  }
};

// Copies a kRows x kCols tile into shared memory as ST: element (r, c) is
// src[base(r) + (c0 + c) * stride_c], zero where base(r) < 0 or c0 + c >= dim (zero padding of
// the dot operands; padded slots are never read by the epilogue). K_MAJOR: dst[c * LD + r],
// else dst[r * LD + c]. VEC: 16-byte loads (the caller checked stride_c == 1, dim % kVec == 0
// and 16-byte alignment of src and every row). ASYNC: where a 16-byte load is stored as it
// is, it is a cp.async copy instead (zero-filled for padding), which lands only once the
// caller's __pipeline_wait_prior retires its group; the other cases load synchronously.
template <typename GT, typename ST, int kRows, int kCols, bool K_MAJOR, int LD, bool ASYNC = false, typename Base>
__device__ __forceinline__ void load_tile(
    ST* __restrict__ dst,
    const GT* __restrict__ src,
    const Base& base,
    int64_t c0,
    int64_t dim,
    int64_t stride_c,
    bool vec) {
  if (vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(GT));
    constexpr int kVecPerRow = kCols / kVec;
    for (int i = threadIdx.x; i < kRows * kVecPerRow; i += kThreads) {
      const int r = i / kVecPerRow;
      const int c = (i % kVecPerRow) * kVec;
      const int64_t b = base(r);
      const bool inside = b >= 0 && c0 + c < dim;
      if constexpr (ASYNC && std::is_same_v<GT, ST> && !K_MAJOR) {
        __pipeline_memcpy_async(dst + r * LD + c, inside ? src + b + c0 + c : src, 16, inside ? 0 : 16);
        continue;
      }
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: +0.0 in every dtype
      if (inside) {
        raw = *reinterpret_cast<const uint4*>(src + b + c0 + c);
      }
      if constexpr (std::is_same_v<GT, ST> && !K_MAJOR) {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = raw;  // LD * sizeof(ST) is a multiple of 16
      } else {
        GT vals[kVec];
        memcpy(vals, &raw, sizeof(raw));
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const ST v = static_cast<ST>(vals[e]);
          if constexpr (K_MAJOR) {
            dst[(c + e) * LD + r] = v;
          } else {
            dst[r * LD + c + e] = v;
          }
        }
      }
    }
  } else {
    const bool channels_fastest = stride_c == 1;  // coalesce along whichever axis is contiguous
    for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
      const int r = channels_fastest ? i / kCols : i % kRows;
      const int c = channels_fastest ? i % kCols : i / kRows;
      const int64_t b = base(r);
      ST v = static_cast<ST>(0.0f);
      if (b >= 0 && c0 + c < dim) {
        v = static_cast<ST>(src[b + (c0 + c) * stride_c]);
      }
      if constexpr (K_MAJOR) {
        dst[c * LD + r] = v;
      } else {
        dst[r * LD + c] = v;
      }
    }
  }
}

// Per-thread accumulators of the slot-tile GEMM and the helpers that fill and store them.
template <Path PATH, typename ST>
struct TileGemm;

// The WMMA paths: 8 warps in a 4 x 2 grid, warp w owning rows 16*(w/2).. and slots 32*(w%2)..
// of the tile as two 16 x 16 accumulator fragments. Operand is the WMMA element type (__half,
// __nv_bfloat16, or precision::tf32 read from fp32 shared memory), K the WMMA depth (16, or 8
// for tf32).
template <typename Operand, int K>
struct WmmaTileGemm {
  static constexpr bool kTf32 = std::is_same_v<Operand, nvcuda::wmma::precision::tf32>;
  using Stored = std::conditional_t<kTf32, float, Operand>;  // the element type in shared memory
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, K, float> acc[2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.0f);
  }

  // Rounds a tf32 operand's fp32 values to tf32, as WMMA requires.
  template <typename Fragment>
  __device__ __forceinline__ static void to_tf32(Fragment& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
  }

  template <int KC, int LDA, int LDB, typename ST>
  __device__ __forceinline__ void chunk(const ST* a_s, const ST* b_s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
    const Stored* a = reinterpret_cast<const Stored*>(a_s);
    const Stored* b = reinterpret_cast<const Stored*>(b_s);
#pragma unroll
    for (int kk = 0; kk < KC; kk += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, Operand, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + (16 * wm) * LDA + kk, LDA);
      to_tf32(fa);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // B^T as a col-major K x N operand: element (k, n) at b[n * LDB + k].
        wmma::fragment<wmma::matrix_b, 16, 16, K, Operand, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b + (32 * wn + 16 * j) * LDB + kk, LDB);
        to_tf32(fb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
#endif
  }

  template <int LDS>
  __device__ __forceinline__ void store(float* s_s) {
    const int warp = threadIdx.x / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(
          s_s + (16 * wm) * LDS + 32 * wn + 16 * j, acc[j], LDS, nvcuda::wmma::mem_row_major);
    }
  }
};

// bf16/fp16: WMMA 16x16x16 tiles.
template <typename ST>
struct TileGemm<Path::kTensor16, ST> : WmmaTileGemm<typename WmmaType<ST>::type, 16> {};

// fp32 as tf32: WMMA 16x16x8 tf32 tiles.
template <typename ST>
struct TileGemm<Path::kTf32, ST> : WmmaTileGemm<nvcuda::wmma::precision::tf32, 8> {};

// Exact fp32 on the CUDA cores: a 16 x 16 thread grid, each thread rows 4*ty.. and slots
// 4*tx.., operands read as float4 from the k-major tiles.
template <typename ST>
struct TileGemm<Path::kSimt, ST> {
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  template <int KC, int LDA, int LDB>
  __device__ __forceinline__ void chunk(const float* a_s, const float* b_s) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 8
    for (int k = 0; k < KC; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(a_s + k * LDA + 4 * ty);
      const float4 b = *reinterpret_cast<const float4*>(b_s + k * LDB + 4 * tx);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  template <int LDS>
  __device__ __forceinline__ void store(float* s_s) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<float4*>(s_s + (4 * ty + i) * LDS + 4 * tx) =
          make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
  }
};

template <Mode MODE, Path PATH, typename feat_t, typename bank_t>
__global__ void __launch_bounds__(kThreads, 2) class_forward_kernel(const ForwardParams<feat_t, bank_t> p) {
  using ST = smem_t<PATH, feat_t>;
  using L = Layout<MODE, PATH, ST>;
  static_assert(PATH != Path::kTensor16 || std::is_same_v<feat_t, bank_t>, "the 16-bit path needs one dtype");

  constexpr int kStages = L::kStages;
  constexpr bool kAsync = kStages > 1;
  __shared__ __align__(128) unsigned char a_bytes[kStages * L::kAStride];
  __shared__ __align__(128) unsigned char b_bytes[kStages * L::kBStride];
  __shared__ __align__(128) float s_s[L::kSBytes / 4];
  __shared__ int64_t row_id[kBlockM];  // row of each of the 64 rows of the group, -1: none
  __shared__ int64_t row_off[kBlockM];  // its offset in features, -1: none
  const auto a_stage = [&](int stage) { return reinterpret_cast<ST*>(a_bytes + stage * L::kAStride); };
  const auto b_stage = [&](int stage) { return reinterpret_cast<ST*>(b_bytes + stage * L::kBStride); };

  const int tid = threadIdx.x;
  const int64_t* tile = p.tiles + 3 * static_cast<int64_t>(blockIdx.x);
  const int64_t cls = tile[0];
  if (cls < 0 || cls >= p.num_classes) return;  // past the last tile (uniform over the block)
  const int64_t start = tile[1] > 0 ? tile[1] : 0;
  const int64_t end = tile[2] < p.num_rows ? tile[2] : p.num_rows;
  int64_t n_valid = p.counts[cls];
  n_valid = n_valid < 0 ? 0 : (n_valid > p.slots ? p.slots : n_valid);
  const auto slot_rows_of = [&](int64_t n0) {  // the slot tile starting at slot n0
    return SlotRows{n0 * p.dim, p.dim, static_cast<int>(n_valid - n0 < kBlockN ? n_valid - n0 : kBlockN)};
  };
  const bank_t* bank_cls = p.bank + cls * p.slots * p.dim;
  const int m = tid / kLanesPerRow;  // epilogue: this thread's row of the group
  const int q = tid % kLanesPerRow;  // and its slot phase (slots q, q + 4, ...)
  const GatheredRows feature_rows{row_off};

  for (int64_t row0 = start; row0 < end; row0 += kBlockM) {
    if (tid < kBlockM) {
      const int64_t r = row0 + tid;
      int64_t row = r < end ? p.rows[r] : -1;
      // A row takes part only if its label is the tile's class: a wrong schedule cannot make a
      // block read another class's bucket or write a row it does not own.
      if (row < 0 || row >= p.num_rows || p.labels[row] != cls) row = -1;
      row_id[tid] = row;
      row_off[tid] = row >= 0 ? (row / p.points) * p.stride_b + (row % p.points) * p.stride_p : -1;
    }
    __syncthreads();
    const int64_t my_row = row_id[m];
    const int64_t my_off = row_off[m];

    // Row norm in fp32: 4 partial sums per row, combined by a fixed butterfly (same bits on all 4).
    float sumsq = 0.0f;
    if (my_row >= 0) {
      for (int64_t c = q; c < p.dim; c += kLanesPerRow) {
        const float x = static_cast<float>(p.features[my_off + c * p.stride_c]);
        sumsq = fmaf(x, x, sumsq);
      }
    }
    sumsq += __shfl_xor_sync(kFullMask, sumsq, 1);
    sumsq += __shfl_xor_sync(kFullMask, sumsq, 2);
    const float inv_norm = 1.0f / fmaxf(sqrtf(sumsq), kEps);  // IEEE sqrt and division

    float best = -std::numeric_limits<float>::infinity();  // "max": running winner of the row
    int64_t best_slot = -1;
    int64_t selected = 0;  // "all": this thread's count and sum of selected similarities
    float selected_sum = 0.0f;

    // A step is one channel chunk of one slot tile (at least one chunk per tile), in order; its
    // operands go to the buffers of one stage of the ring, the stages taken in turn.
    int64_t load_n0 = 0;  // the next step to load: its slot tile, chunk and stage
    int64_t load_c0 = 0;
    int load_stage = 0;
    // With one chunk per slot tile (C <= kChunk) every stage holds the same feature chunk once
    // it has been filled, so only the first kStages steps load it.
    const bool a_loaded_once = p.dim <= L::kChunk;
    const auto load_next = [&] {
      if (load_n0 < n_valid) {
        if (!a_loaded_once || load_n0 < kStages * kBlockN) {
          load_tile<feat_t, ST, kBlockM, L::kChunk, L::kKMajor, L::kLdA, kAsync>(
              a_stage(load_stage), p.features, feature_rows, load_c0, p.dim, p.stride_c, p.vec_features);
        }
        load_tile<bank_t, ST, kBlockN, L::kChunk, L::kKMajor, L::kLdB, kAsync>(
            b_stage(load_stage), bank_cls, slot_rows_of(load_n0), load_c0, p.dim, 1, p.vec_bank);
        load_c0 += L::kChunk;
        if (load_c0 >= p.dim) {
          load_c0 = 0;
          load_n0 += kBlockN;
        }
      }
      load_stage = load_stage + 1 == kStages ? 0 : load_stage + 1;
    };
    // Pipeline: the copies of the next kStages - 1 steps are in flight while a step computes,
    // one cp.async group per step (empty past the last step, so the group count stays regular).
    if constexpr (kAsync) {
      for (int s = 0; s < kStages - 1; ++s) {
        load_next();
        __pipeline_commit();
      }
    }
    int stage = 0;  // of the step computed next
    for (int64_t n0 = 0; n0 < n_valid; n0 += kBlockN) {
      TileGemm<PATH, ST> gemm;  // raw dot products of the 64 rows with the slot tile
      gemm.zero();
      for (int64_t c0 = 0; c0 == 0 || c0 < p.dim; c0 += L::kChunk) {
        if constexpr (kAsync) {
          __pipeline_wait_prior(kStages - 2);  // this thread's copies of this step have landed
        } else {
          load_next();
        }
        // Everyone's operands of this step are in, and everyone is done with the previous
        // step's buffers.
        __syncthreads();
        if constexpr (kAsync) {
          load_next();  // into the previous step's buffers
          __pipeline_commit();
        }
        gemm.template chunk<L::kChunk, L::kLdA, L::kLdB>(a_stage(stage), b_stage(stage));
        if constexpr (!kAsync) __syncthreads();  // the next step loads into the same buffers
        stage = stage + 1 == kStages ? 0 : stage + 1;
      }

      // The slot tile is complete: its dot products to s_s, then the mode's epilogue.
      const SlotRows slot_rows = slot_rows_of(n0);
      const int nt = slot_rows.count;
      gemm.template store<L::kLdS>(s_s);
      __syncthreads();

      if constexpr (MODE == Mode::kMax) {
        float tile_best = -std::numeric_limits<float>::infinity();
        int tile_slot = -1;
        for (int j = q; j < nt; j += kLanesPerRow) {  // increasing slots: the first maximum stays
          const float v = s_s[m * L::kLdS + j];
          if (v > tile_best) {
            tile_best = v;
            tile_slot = j;
          }
        }
#pragma unroll
        for (int offset = 1; offset < kLanesPerRow; offset <<= 1) {
          const float other = __shfl_xor_sync(kFullMask, tile_best, offset);
          const int other_slot = __shfl_xor_sync(kFullMask, tile_slot, offset);
          // Larger value wins; on equal values the lower slot; "no slot" (-1) never wins.
          if (other_slot >= 0 &&
              (tile_slot < 0 || other > tile_best || (other == tile_best && other_slot < tile_slot))) {
            tile_best = other;
            tile_slot = other_slot;
          }
        }
        if (tile_slot >= 0 && tile_best > best) {  // strict: on a tie the earlier tile stays
          best = tile_best;
          best_slot = n0 + tile_slot;
        }
      } else {
        bool any = false;
        for (int j = q; j < kBlockN; j += kLanesPerRow) {
          const float s = __fmul_rn(s_s[m * L::kLdS + j], inv_norm);  // not fused into the sum below
          const bool take = my_row >= 0 && j < nt && s > p.threshold;
          if (take) {
            ++selected;
            selected_sum += s;
            any = true;
          }
          if constexpr (L::kHasPD) {
            reinterpret_cast<ST*>(p_region<L>())[m * L::kLdP + j] = static_cast<ST>(take ? 1.0f : 0.0f);
          } else {
            s_s[m * L::kLdS + j] = take ? 1.0f : 0.0f;  // in place: each thread owns its entries
          }
        }
        if (__syncthreads_or(any ? 1 : 0)) {
          ST* b_s = b_stage(stage == 0 ? kStages - 1 : stage - 1);  // the last step's: no copy in flight targets it
          // dsum[rows] += P @ bank[slot tile], one channel chunk at a time.
          for (int64_t c0 = 0; c0 < p.dim; c0 += kBlockK) {
            load_tile<bank_t, ST, kBlockN, kBlockK, false, L::kLdBD>(b_s, bank_cls, slot_rows, c0, p.dim, 1, p.vec_bank);
            if constexpr (L::kHasPD) {
              float* d_s = s_s;  // S's values are spent: the selection is in P now
              for (int i = tid; i < kBlockM * kBlockK; i += kThreads) {
                const int r = i / kBlockK;
                const int c = i % kBlockK;
                const int64_t row = row_id[r];
                d_s[r * L::kLdD + c] = (row >= 0 && c0 + c < p.dim) ? p.dsum[row * p.dim + c0 + c] : 0.0f;
              }
              __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
              __trap();
#else
              {
                using namespace nvcuda;
                using WT = typename WmmaType<ST>::type;
                const int warp = tid / 32;
                const int wm = warp / 2;  // 4 x 2 warps over the 64 x 32 chunk
                const int wn = warp % 2;
                const WT* p_w = reinterpret_cast<const WT*>(p_region<L>());
                const WT* b_w = reinterpret_cast<const WT*>(b_s);
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::load_matrix_sync(acc, d_s + (16 * wm) * L::kLdD + 16 * wn, L::kLdD, wmma::mem_row_major);
#pragma unroll
                for (int nb = 0; nb < kBlockN; nb += 16) {
                  wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fp;
                  wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> fv;
                  wmma::load_matrix_sync(fp, p_w + (16 * wm) * L::kLdP + nb, L::kLdP);
                  wmma::load_matrix_sync(fv, b_w + nb * L::kLdBD + 16 * wn, L::kLdBD);
                  wmma::mma_sync(acc, fp, fv, acc);
                }
                wmma::store_matrix_sync(d_s + (16 * wm) * L::kLdD + 16 * wn, acc, L::kLdD, wmma::mem_row_major);
              }
#endif
              __syncthreads();
              for (int i = tid; i < kBlockM * kBlockK; i += kThreads) {
                const int r = i / kBlockK;
                const int c = i % kBlockK;
                const int64_t row = row_id[r];
                if (row >= 0 && c0 + c < p.dim) p.dsum[row * p.dim + c0 + c] = d_s[r * L::kLdD + c];
              }
            } else {
              __syncthreads();
              // Exact fp32: warp w takes rows w, w + 8, ..., lane = channel of the chunk.
              const int warp = tid / 32;
              const int lane = tid % 32;
              const int64_t c = c0 + lane;
              for (int r = warp; r < kBlockM; r += kWarps) {
                const int64_t row = row_id[r];
                if (row < 0) continue;  // uniform over the warp
                float acc = c < p.dim ? p.dsum[row * p.dim + c] : 0.0f;
                for (int n = 0; n < nt; ++n) {
                  if (s_s[r * L::kLdS + n] != 0.0f) acc += b_s[n * L::kLdBD + lane];  // broadcast test
                }
                if (c < p.dim) p.dsum[row * p.dim + c] = acc;
              }
            }
            __syncthreads();  // b_s (and d_s) are reused by the next chunk
          }
        }
      }
    }

    if constexpr (MODE == Mode::kMax) {
      if (q == 0 && my_row >= 0) {
        // No winner (empty bucket): -inf, even where inv_norm is 0 (a norm overflowing fp32).
        p.values[my_row] = best_slot >= 0 ? best * inv_norm : -std::numeric_limits<float>::infinity();
        p.indices[my_row] = best_slot;
      }
    } else {
      selected += __shfl_xor_sync(kFullMask, selected, 1);
      selected += __shfl_xor_sync(kFullMask, selected, 2);
      selected_sum += __shfl_xor_sync(kFullMask, selected_sum, 1);
      selected_sum += __shfl_xor_sync(kFullMask, selected_sum, 2);
      if (q == 0 && my_row >= 0) {
        p.count[my_row] = selected;
        p.ssum[my_row] = selected_sum;
      }
    }
    __syncthreads();  // row_id / row_off are rewritten by the next row group
  }
}

// tiles[b] = (class, start, end) of forward block b: the classes' tiles in class order, class
// k's rows rows[bounds[k]:bounds[k + 1]] cut into tiles of `tile_rows`; (-1, 0, 0) past the
// last tile. One thread per block, K steps each.
__global__ void __launch_bounds__(kThreads) tile_table_kernel(
    const int64_t* __restrict__ bounds, int64_t num_classes, int64_t tile_rows, int64_t num_blocks,
    int64_t* __restrict__ tiles) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= num_blocks) return;
  int64_t cls = -1, start = 0, end = 0;
  for (int64_t k = 0, t = b; k < num_classes; ++k) {
    const int64_t first = bounds[k];
    const int64_t last = bounds[k + 1];
    const int64_t count = last > first ? (last - first + tile_rows - 1) / tile_rows : 0;
    if (t < count) {
      cls = k;
      start = first + t * tile_rows;
      end = last - start < tile_rows ? last : start + tile_rows;
      break;
    }
    t -= count;
  }
  tiles[3 * b] = cls;
  tiles[3 * b + 1] = start;
  tiles[3 * b + 2] = end;
}

// grad[i, :] = g_i / r_i * (v_i - s_i / r_i * f_i), one warp per row. GATHER ("max"):
// v_i = bank[labels[i], indices[i]], zero gradient where the index is -1 (or out of range);
// otherwise ("all") v_i = dsum[i]. fp32 arithmetic without contraction (as PyTorch's
// separate elementwise ops), rounded to the features' dtype to nearest even.
template <bool GATHER, typename feat_t, typename pull_t>
__global__ void __launch_bounds__(kThreads) row_gradient_kernel(
    feat_t* __restrict__ out,
    const feat_t* __restrict__ features,
    int64_t points,
    int64_t stride_b,
    int64_t stride_p,
    int64_t stride_c,
    int64_t num_rows,
    int64_t dim,
    const float* __restrict__ grad,
    const float* __restrict__ sims,
    const pull_t* __restrict__ pulled,
    int64_t num_classes,
    int64_t slots,
    const int64_t* __restrict__ labels,
    const int64_t* __restrict__ indices) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= num_rows) return;  // uniform over the warp
  float g = grad[row];
  float s = sims[row];
  const pull_t* v = nullptr;
  if constexpr (GATHER) {
    const int64_t slot = indices[row];
    const int64_t label = labels[row];
    if (slot >= 0 && slot < slots && label >= 0 && label < num_classes) {
      if (g != 0.0f) v = pulled + (label * slots + slot) * dim;  // rows without gradient skip the gather
    } else {
      g = 0.0f;
      s = 0.0f;
    }
  } else {
    v = pulled + row * dim;
  }
  const feat_t* f = features + (row / points) * stride_b + (row % points) * stride_p;
  float sumsq = 0.0f;
  for (int64_t c = lane; c < dim; c += 32) {
    const float x = static_cast<float>(f[c * stride_c]);
    sumsq = fmaf(x, x, sumsq);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(kFullMask, sumsq, offset);
  const float inv_norm = 1.0f / fmaxf(sqrtf(sumsq), kEps);
  const float scale = __fmul_rn(g, inv_norm);
  const float shrink = __fmul_rn(s, inv_norm);
  feat_t* o = out + row * dim;
  for (int64_t c = lane; c < dim; c += 32) {
    const float x = static_cast<float>(f[c * stride_c]);
    const float pv = v != nullptr ? static_cast<float>(v[c]) : 0.0f;
    o[c] = static_cast<feat_t>(__fmul_rn(scale, __fsub_rn(pv, __fmul_rn(shrink, x))));
  }
}

// --------------------------------------------------------------------------------------------
// Host side, shared by the GPU ops and the emulation: fill the parameters, pick the kernel,
// allocate the outputs. Arguments are checked by the caller. `launch(kernel, grid, threads,
// args...)` runs `kernel(args...)` on a grid of thread blocks of `threads` threads.

// 16-byte vector loads of a (B, P, C) view: unit channel stride, C and every row offset a
// multiple of the vector width, aligned base pointer.
inline bool vector_loads_ok(const void* ptr, int64_t element_size, int64_t dim, int64_t batch, int64_t points,
                            int64_t stride_b, int64_t stride_p, int64_t stride_c) {
  const int64_t vec = 16 / element_size;
  return stride_c == 1 && dim % vec == 0 && (batch <= 1 || stride_b % vec == 0) &&
      (points <= 1 || stride_p % vec == 0) && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// Picks the path: same 16-bit dtype -> tensor cores; fp32 x fp32 -> tf32 or exact fp32 as asked;
// any mixed pair -> exact fp32 (neither side rounded).
template <Mode MODE, typename feat_t, typename bank_t, typename Launch>
void launch_forward(const ForwardParams<feat_t, bank_t>& params, int64_t num_blocks, Fp32Precision precision,
                    const Launch& launch) {
  const dim3 grid(static_cast<unsigned int>(num_blocks));
  if constexpr (std::is_same_v<feat_t, bank_t> && !std::is_same_v<feat_t, float>) {
    launch(class_forward_kernel<MODE, Path::kTensor16, feat_t, bank_t>, grid, kThreads, params);
  } else if constexpr (std::is_same_v<feat_t, float> && std::is_same_v<bank_t, float>) {
    if (precision == Fp32Precision::kTf32) {
      launch(class_forward_kernel<MODE, Path::kTf32, feat_t, bank_t>, grid, kThreads, params);
    } else {
      launch(class_forward_kernel<MODE, Path::kSimt, feat_t, bank_t>, grid, kThreads, params);
    }
  } else {
    launch(class_forward_kernel<MODE, Path::kSimt, feat_t, bank_t>, grid, kThreads, params);
  }
}

template <Mode MODE, typename Launch>
void run_forward(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    double threshold,
    Fp32Precision precision,
    float* values,
    int64_t* indices,
    int64_t* count,
    float* ssum,
    float* dsum,
    const Launch& launch) {
  const int64_t num_rows = features.size(0) * features.size(1);
  if (num_rows == 0 || bank.size(0) == 0) return;
  const int64_t num_blocks = class_tile_blocks(num_rows, bank.size(0), tile_rows);
  const at::Tensor tiles = at::empty({num_blocks, 3}, bounds.options());
  launch(
      tile_table_kernel, dim3(static_cast<unsigned int>((num_blocks + kThreads - 1) / kThreads)), kThreads,
      bounds.const_data_ptr<int64_t>(), bank.size(0), tile_rows, num_blocks, tiles.data_ptr<int64_t>());
  COSSIM_FAST_DISPATCH_FLOATS(features.scalar_type(), "cossim_fast class forward (features)", [&] {
    using feat_t = scalar_t;
    COSSIM_FAST_DISPATCH_FLOATS(bank.scalar_type(), "cossim_fast class forward (bank)", [&] {
      using bank_t = scalar_t;
      ForwardParams<feat_t, bank_t> params{};
      params.features = features.const_data_ptr<feat_t>();
      params.points = features.size(1);
      params.stride_b = features.stride(0);
      params.stride_p = features.stride(1);
      params.stride_c = features.stride(2);
      params.num_rows = features.size(0) * features.size(1);
      params.dim = features.size(2);
      params.bank = bank.const_data_ptr<bank_t>();
      params.num_classes = bank.size(0);
      params.slots = bank.size(1);
      params.counts = counts.const_data_ptr<int64_t>();
      params.labels = labels.const_data_ptr<int64_t>();
      params.rows = rows.const_data_ptr<int64_t>();
      params.tiles = tiles.const_data_ptr<int64_t>();
      params.threshold = static_cast<float>(threshold);
      params.vec_features = vector_loads_ok(
          params.features, sizeof(feat_t), params.dim, features.size(0), params.points, params.stride_b,
          params.stride_p, params.stride_c);
      params.vec_bank = vector_loads_ok(params.bank, sizeof(bank_t), params.dim, 1, 1, 0, 0, 1);
      params.values = values;
      params.indices = indices;
      params.count = count;
      params.ssum = ssum;
      params.dsum = dsum;
      launch_forward<MODE, feat_t, bank_t>(params, num_blocks, precision, launch);
    });
  });
}

// "max": (values, indices), (-inf, -1) for rows no block writes (ignored, empty bucket).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> max_forward(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    Fp32Precision precision,
    const Launch& launch) {
  const int64_t num_rows = features.size(0) * features.size(1);
  at::Tensor values = at::full({num_rows}, -std::numeric_limits<float>::infinity(), features.options().dtype(at::kFloat));
  at::Tensor indices = at::full({num_rows}, -1, labels.options());
  run_forward<Mode::kMax>(
      features, labels, bank, counts, rows, bounds, tile_rows, 0.0, precision, values.data_ptr<float>(),
      indices.data_ptr<int64_t>(), nullptr, nullptr, nullptr, launch);
  return {values, indices};
}

// "all": (count, ssum, dsum), zero for rows no block writes.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> all_forward(
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& counts,
    const at::Tensor& rows,
    const at::Tensor& bounds,
    int64_t tile_rows,
    double threshold,
    Fp32Precision precision,
    const Launch& launch) {
  const int64_t num_rows = features.size(0) * features.size(1);
  at::Tensor count = at::zeros({num_rows}, labels.options());
  at::Tensor ssum = at::zeros({num_rows}, features.options().dtype(at::kFloat));
  at::Tensor dsum = at::zeros({num_rows, features.size(2)}, features.options().dtype(at::kFloat));
  run_forward<Mode::kAll>(
      features, labels, bank, counts, rows, bounds, tile_rows, threshold, precision, nullptr, nullptr,
      count.data_ptr<int64_t>(), ssum.data_ptr<float>(), dsum.data_ptr<float>(), launch);
  return {count, ssum, dsum};
}

template <bool GATHER, typename feat_t, typename pull_t, typename Launch>
void launch_gradient(
    const at::Tensor& out,
    const at::Tensor& features,
    const at::Tensor& grad,
    const at::Tensor& sims,
    const pull_t* pulled,
    int64_t num_classes,
    int64_t slots,
    const int64_t* labels,
    const int64_t* indices,
    const Launch& launch) {
  const int64_t num_rows = features.size(0) * features.size(1);
  launch(
      row_gradient_kernel<GATHER, feat_t, pull_t>,
      dim3(static_cast<unsigned int>((num_rows + kWarps - 1) / kWarps)),
      kThreads,
      out.data_ptr<feat_t>(),
      features.const_data_ptr<feat_t>(),
      features.size(1),
      features.stride(0),
      features.stride(1),
      features.stride(2),
      num_rows,
      features.size(2),
      grad.const_data_ptr<float>(),
      sims.const_data_ptr<float>(),
      pulled,
      num_classes,
      slots,
      labels,
      indices);
}

template <typename Launch>
at::Tensor max_backward(
    const at::Tensor& grad_values,
    const at::Tensor& features,
    const at::Tensor& labels,
    const at::Tensor& bank,
    const at::Tensor& values,
    const at::Tensor& indices,
    const Launch& launch) {
  at::Tensor out = at::empty({features.size(0) * features.size(1), features.size(2)}, features.options());
  if (out.numel() == 0) return out;
  COSSIM_FAST_DISPATCH_FLOATS(features.scalar_type(), "cuda_max_backward (features)", [&] {
    using feat_t = scalar_t;
    COSSIM_FAST_DISPATCH_FLOATS(bank.scalar_type(), "cuda_max_backward (bank)", [&] {
      launch_gradient<true, feat_t, scalar_t>(
          out, features, grad_values, values, bank.const_data_ptr<scalar_t>(), bank.size(0), bank.size(1),
          labels.const_data_ptr<int64_t>(), indices.const_data_ptr<int64_t>(), launch);
    });
  });
  return out;
}

template <typename Launch>
at::Tensor all_backward(
    const at::Tensor& grad_ssum,
    const at::Tensor& features,
    const at::Tensor& ssum,
    const at::Tensor& dsum,
    const Launch& launch) {
  at::Tensor out = at::empty({features.size(0) * features.size(1), features.size(2)}, features.options());
  if (out.numel() == 0) return out;
  COSSIM_FAST_DISPATCH_FLOATS(features.scalar_type(), "cuda_all_backward (features)", [&] {
    launch_gradient<false, scalar_t, float>(
        out, features, grad_ssum, ssum, dsum.const_data_ptr<float>(), 0, 0, nullptr, nullptr, launch);
  });
  return out;
}

}  // namespace
}  // namespace cossim_fast::kernels
