// The keep rule of each sparsification mode, a work item at a time: everything (none), the cut-offs
// of the magnitude and outliers selects, DARE's Philox draws (random), DELLA's draws against the
// probabilities of the ranks within rows (rank). The rescale pass keeps every mode's flags this way;
// the merge pass draws the random and rank modes' here and tests the cut-offs inline instead.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "magnitude_keys.h"
#include "philox.h"
#include "row_ranks.h"
#include "sparsify.h"

namespace merge_engine::task_vectors {

namespace {

// keep_by_cutoffs over a block, with the cut-offs in locals and the order fixed at compile time: the
// uint8_t stores may alias anything, so a loop reading cut[] through a pointer reloads it every
// element and does not vectorise.
// Keys (< 2^31) and in-block indices fit 32-bit lanes, twice as many per vector as int64: the cut-off
// keys are clamped to [-1, 2^31 - 1] (same comparisons against any key: a "nothing" cut-off keeps its
// meaning, and one equal to a NaN key has count 0) and index < c becomes j < c - start, clamped to [0, len].
template <typename T, bool kLargest>
void keep_between_cutoffs(const std::array<int64_t, 4>& cut, const T* __restrict__ d, int64_t start, int64_t len,
                          uint8_t* __restrict__ keep) {
  auto key32 = [](int64_t t) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(t, -1), INT32_MAX)); };
  auto rel32 = [&](int64_t c) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(c - start, 0), len)); };
  const int32_t lo_t = key32(cut[0]), lo_c = rel32(cut[1]), hi_t = key32(cut[2]), hi_c = rel32(cut[3]);
  for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
    const int32_t key = static_cast<int32_t>(key_of<T>(d[j]));
    const bool in_hi = (kLargest ? key > hi_t : key < hi_t) | ((key == hi_t) & (j < hi_c));
    const bool in_lo = (kLargest ? key > lo_t : key < lo_t) | ((key == lo_t) & (j < lo_c));
    keep[j] = in_hi & !in_lo;
  }
}

}  // namespace

// Which elements of [start, start + len) of expert i survive its sparsification.
template <typename T>
void keep_flags(const Params& P, int i, const T* d, int64_t start, int64_t len, int64_t row_cols,
                uint8_t* keep, float* scratch_p) {
  switch (P.mode) {
    case kNone:
      std::fill(keep, keep + len, 1);
      return;
    case kMagnitude:
      return keep_between_cutoffs<T, true>(P.cuts[i], d, start, len, keep);
    case kOutliers:
      return keep_between_cutoffs<T, false>(P.cuts[i], d, start, len, keep);
    case kRandom:
    case kRank: {
      const double density = P.densities[i];
      const float p = static_cast<float>(density);  // DARE: u < density in fp32
      if (density >= 1) { std::fill(keep, keep + len, 1); return; }
      if (P.mode == kRank && density <= 0) { std::fill(keep, keep + len, 0); return; }
      if (P.mode == kRank) rank_probabilities<T>(d, row_cols, density, P.epsilons[i], scratch_p);
      // the Philox draws of every 4-element group overlapping the block first (a loop over groups the
      // compiler vectorises), then the comparisons
      const int64_t first = start >> 2, groups = ((start + len + 3) >> 2) - first;
      thread_local std::vector<float> draws;
      draws.resize(static_cast<size_t>(groups) * 4);
      float* __restrict__ u = draws.data();
      uniforms(first, groups, i, P.key0, P.key1, u);
      const float* __restrict__ uj = u + (start & 3);
      // two loops: one with a select of the operand compiles to masked loads, which on AMD cores take
      // a microcode assist per masked-off lane (two thirds of DARE's time)
      if (P.mode == kRank)
        for (int64_t j = 0; j < len; ++j) keep[j] = uj[j] < scratch_p[j];
      else
        for (int64_t j = 0; j < len; ++j) keep[j] = uj[j] < p;
      return;
    }
  }
}

#define INSTANTIATE(T) \
  template void keep_flags<T>(const Params&, int, const T*, int64_t, int64_t, int64_t, uint8_t*, float*);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
