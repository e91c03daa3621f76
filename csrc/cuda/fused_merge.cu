// The fused merge of K task vectors on the GPU (TIES, DARE, breadcrumbs, DELLA, task arithmetic): one
// elementwise pass, groups of 4 elements per thread, each expert's kept, rescaled and weighted delta,
// the sign election and disjoint mean, lambda and the base.
//
// Every arithmetic step rounds to the compute dtype T exactly where the PyTorch reference
// (merge_engine/ops/consensus.py: merge_task_vectors_reference) rounds, and sums over experts run
// in fp32 in expert order, as in the CPU kernels; so outputs are bit-identical to the CPU kernels
// except for the L1 rescale factor, whose whole-tensor sums are taken in a different order (here:
// fp64, per-block partials combined in a fixed tree, so the result is deterministic run to run).
// DELLA's offset density - epsilon is formed in fp64 and rounded once to fp32, as the reference and
// the CPU kernels (csrc/cpu/row_ranks.cpp) form it, so its draws are theirs.
// Built with -fmad=false: a fused multiply-add would round differently from torch and from the CPU
// build (-ffp-contract=off). Division and conversions are IEEE round-to-nearest-even (no fast math).
#include <c10/cuda/CUDAException.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fused_merge.cuh"
#include "launch.cuh"

namespace merge_engine::task_vectors {

namespace {

// Each thread takes groups of 4 consecutive elements: one Philox call serves the group.
template <typename D>
__global__ void merge_kernel(const MergeArgs<D> a) {
  __shared__ float factors[kMaxExperts];
  if (threadIdx.x < kMaxExperts)
    factors[threadIdx.x] = a.factors != nullptr && static_cast<int>(threadIdx.x) < a.K ? a.factors[threadIdx.x] : 1.f;
  __syncthreads();
  const int K = a.K;
  // the reference's NaN factor (Inf / Inf: a kept delta that overflowed T) makes all of that expert's deltas
  // NaN, and every merged value with them (the sign election below would drop them)
  bool nan_factor = false;
  for (int i = 0; i < K; ++i) nan_factor |= isnan(factors[i]);
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < groups;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g0 = q * 4;
    const int m = static_cast<int>(a.n - g0 < 4 ? a.n - g0 : 4);
    // weighted (sparsified, rescaled, weighted) deltas, each rounded to T
    float wd[kMaxExperts][4];
#pragma unroll
    for (int i = 0; i < kMaxExperts; ++i) {
      if (i < K) {
        float u[4] = {0.f, 0.f, 0.f, 0.f};
        if (a.mode == kRandom && a.probs[i] < 1.f) uniform4(static_cast<uint64_t>(q), static_cast<uint32_t>(i), a.key0, a.key1, u);
        const float f = factors[i], w = a.weights[i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < m) {
            const int64_t g = g0 + j;
            const float e = to_f(a.experts[i][g]);
            if (!isfinite(e)) atomicAdd(a.non_finite + 1 + i, 1ull);  // rare: reported after the pass
            const float d = round_f<D>(e - to_f(a.base[g]));
            // d or +0 where the reference has d * 0, as the CPU kernel: the sign of a zero term changes no sum
            // and no agreement, and an overflowed (Inf) delta that is dropped adds nothing, not NaN
            float kept = keep_of<D>(a, i, g, d, u[j]) ? d : 0.f;
            if (f != 1.f) kept = round_f<D>(kept * f);
            wd[i][j] = round_f<D>(kept * w);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < m) {
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kMaxExperts; ++i)
          if (i < K) sum += wd[i][j];
        float mixed;
        if (a.consensus) {
          const bool positive = round_f<D>(sum) >= 0.f;  // a zero sum elects +
          float agree_sum = 0.f, agree_w = 0.f;
#pragma unroll
          for (int i = 0; i < kMaxExperts; ++i) {
            if (i < K) {
              const float v = wd[i][j];
              if (positive ? v > 0.f : v < 0.f) {
                agree_sum += v;
                agree_w += a.weights[i];
              }
            }
          }
          mixed = round_f<D>(agree_sum);
          if (a.normalize) {
            float divisor = round_f<D>(agree_w);
            if (divisor == 0.f) divisor = 1.f;
            mixed = round_f<D>(mixed / divisor);
          }
        } else {
          mixed = round_f<D>(sum);
          if (a.normalize) mixed = round_f<D>(mixed / a.all_divisor);
        }
        if (a.lambda != 1.f) mixed = round_f<D>(mixed * a.lambda);
        const int64_t g = g0 + j;
        const float b = to_f(a.base[g]);
        if (!isfinite(b)) atomicAdd(a.non_finite, 1ull);
        a.out[g] = from_f<D>(b + (nan_factor ? NAN : mixed));
      }
    }
  }
}

}  // namespace

template <typename D> void launch_merge(const MergeArgs<D>& a, cudaStream_t stream) {
  merge_kernel<D><<<grid_for(ceil_div(a.n, 4), kThreads), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INSTANTIATE(D) template void launch_merge<D>(const MergeArgs<D>&, cudaStream_t);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
