// The fused merge of the task-vector family's CUDA kernels (fused_merge.cu): its arguments, and the
// keep rule of every sparsification mode, which the rescale pass (rescale.cu) applies too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../task_vectors.h"
#include "magnitude_keys.cuh"

namespace merge_engine::task_vectors {

constexpr int kMaxExperts = 16;  // experts per fused launch (pointers travel in the kernel arguments)

// The merge's inputs, output and parameters, passed by value to the merge and rescale kernels.
template <typename D>
struct MergeArgs {
  const D* base;
  const D* experts[kMaxExperts];
  D* out;
  int64_t n;
  int K, mode;
  bool consensus, normalize;
  float lambda;
  float all_divisor;                 // sum of the weights in T, 1 when |sum| < 1e-8 in T (no consensus)
  uint32_t key0, key1;
  float weights[kMaxExperts];        // already rounded to T, as torch.tensor(weights, dtype=T)
  float probs[kMaxExperts];          // random, rank: density
  int64_t cuts[kMaxExperts][4];      // magnitude / outliers: {lo_T, lo_c, hi_T, hi_c}
  const float* factors;              // L1 rescale per expert (1: none), or null
  const uint8_t* rank_keep;          // rank: [K][n] keep flags of DELLA's draws, or null
  unsigned long long* non_finite;    // [K + 1]: NaN/Inf counts of the base, then of each expert
};

// Whether element g (delta d, uniform u of its Philox word) of expert i survives sparsification.
template <typename D>
__device__ __forceinline__ bool keep_of(const MergeArgs<D>& a, int i, int64_t g, float d, float u) {
  switch (a.mode) {
    case kMagnitude: return keep_by_cutoffs(key_f<D>(d), g, a.cuts[i], true);
    case kOutliers: return keep_by_cutoffs(key_f<D>(d), g, a.cuts[i], false);
    case kRandom: return a.probs[i] >= 1.f || u < a.probs[i];
    case kRank: return a.probs[i] >= 1.f || (a.probs[i] > 0.f && a.rank_keep[i * a.n + g] != 0);
    default: return true;
  }
}

// Whether the reference rescales expert i: not where it returns the delta whole (density >= 1) or zeros
// (TIES's and DELLA's density <= 0), where an overflowed delta must not make the factor NaN.
template <typename D> __host__ __device__ inline bool rescaled(const MergeArgs<D>& a, int i) {
  return a.probs[i] < 1.f && (a.probs[i] > 0.f || a.mode == kRandom || a.mode == kOutliers);
}

// Launches the merge on stream: a.out = the merge, and the NaN/Inf counts into a.non_finite.
template <typename D> void launch_merge(const MergeArgs<D>& a, cudaStream_t stream);

}  // namespace merge_engine::task_vectors
