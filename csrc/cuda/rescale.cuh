// mergekit's L1 rescale on the GPU (rescale.cu): one factor per expert, from a pass before the merge.
#pragma once

#include <ATen/core/Tensor.h>

#include <cuda_runtime.h>

#include "fused_merge.cuh"

namespace merge_engine::task_vectors {

// The factors of a's K experts (|delta|_1 / |kept|_1 in T, NaN for none): a float [K] tensor on a's
// device, formed on stream.
template <typename D> at::Tensor l1_rescale_factors(const MergeArgs<D>& a, const at::TensorOptions& options,
                                                    cudaStream_t stream);

}  // namespace merge_engine::task_vectors
