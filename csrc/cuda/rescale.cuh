// mergekit's L1 rescale on the GPU (rescale.cu): one factor per expert, from a pass before the merge.
#pragma once

#include <ATen/core/Tensor.h>

#include <cuda_runtime.h>

#include <vector>

#include "fused_merge.cuh"

namespace merge_engine::task_vectors {

// The factors of a's K experts (|delta|_1 / |kept|_1 in T, NaN for none): a float [K] tensor on a's
// device, formed on stream.
template <typename D> at::Tensor l1_rescale_factors(const MergeArgs<D>& a, const at::TensorOptions& options,
                                                    cudaStream_t stream);

// The same for the cut-off modes (magnitude, outliers), a's cut-offs found: the norms are torch's sums of
// |delta| and of the kept |delta|, as the reference and mergekit take them.
template <typename D> at::Tensor cutoff_rescale_factors(const MergeArgs<D>& a, const at::Tensor& base,
                                                        const std::vector<at::Tensor>& experts, cudaStream_t stream);

}  // namespace merge_engine::task_vectors
