// Shared by the CPU (csrc/cpu/task_vectors.cpp) and CUDA (csrc/cuda/task_vectors.cu) kernels of the
// task-vector family (TIES, DARE, breadcrumbs, DELLA): Philox bits, magnitude keys, cut-off tests,
// and rounding to the compute dtype. The Python references in merge_engine/ops/ define the results;
// every helper here mirrors one step of them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ME_HD __host__ __device__ __forceinline__
#else
#define ME_HD inline
#endif

namespace merge_engine {

// Sparsification modes, as in merge_task_vectors(sparsify=...).
enum Mode : int { kNone = 0, kMagnitude = 1, kRandom = 2, kOutliers = 3, kRank = 4 };

// Cut-off selecting nothing (ops/select.py): descending and ascending orders.
constexpr int64_t kNothingLargest = INT64_MAX;
constexpr int64_t kNothingSmallest = -1;

// ---- Philox4x32-10 (ops/random.py): element i of stream s is word i % 4 of
// philox(counter = (i / 4 low, i / 4 high, s, 0), key). ----
ME_HD void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

ME_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(c[0], 0xD2511F53u, hi0, lo0);
    mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
    uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The four uniforms of block b (elements 4b..4b+3) of one stream: (bits >> 8) * 2^-24.
ME_HD void uniform4(uint64_t block, uint32_t stream, uint32_t k0, uint32_t k1, float u[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, 0u};
  philox4x32_10(c, k0, k1);
  for (int j = 0; j < 4; ++j) u[j] = static_cast<float>(c[j] >> 8) * 5.9604644775390625e-08f;
}

// ---- magnitude keys: |x|'s bit pattern as an integer (ops/select.py) ----
ME_HD int64_t key_of_bits16(uint16_t bits) { return bits & 0x7FFF; }
ME_HD int64_t key_of_float(float x) {
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(x);
#else
  std::memcpy(&b, &x, 4);
#endif
  return b & 0x7FFFFFFFu;
}

// Membership in the first `count` elements of the stable order, given its cut-off (T, c).
ME_HD bool selected(int64_t key, int64_t index, int64_t t, int64_t c, bool largest) {
  return (largest ? key > t : key < t) || (key == t && index < c);
}

// Per-expert keep rule of the fused merge: for magnitude (largest) and outliers (ascending),
// keep = first(hi) minus first(lo); cut[] = {lo_T, lo_c, hi_T, hi_c}.
ME_HD bool keep_by_cutoffs(int64_t key, int64_t index, const int64_t cut[4], bool largest) {
  return selected(key, index, cut[2], cut[3], largest) && !selected(key, index, cut[0], cut[1], largest);
}

// Keys at or above this are NaN (Inf is the limit itself), per storage width.
constexpr int64_t kInfKey16Half = 0x7C00, kInfKey16BFloat = 0x7F80, kInfKey32 = 0x7F800000;

}  // namespace merge_engine
