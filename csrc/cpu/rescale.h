// mergekit's L1 rescale (rescale.cpp): one factor per expert, from a pass before the merge.
#pragma once

#include <cstdint>
#include <vector>

#include "fused_merge.h"

namespace merge_engine::task_vectors {

// mergekit's L1 rescale factor per expert: |delta|_1 / |kept|_1 in T, none (1) when either is < 1e-7.
// The random and rank modes' norms are sums in double lanes (their draws differ from mergekit's anyway);
// the keep flags this pass draws (DARE's Philox numbers, DELLA's row ranks too) are kept as bits,
// kept_bits[i][item * bytes_per_item(span)..], for the merge pass to unpack instead of drawing again.
template <typename T>
std::vector<float> rescale_factors(const Params& P, const T* base, const std::vector<const T*>& experts,
                                   int64_t n, WorkItems items, int64_t cols,
                                   std::vector<std::vector<uint8_t>>& kept_bits);

// The same factors for the cut-off modes (magnitude, outliers), with the norms taken by torch's sum as
// the reference and mergekit take them, so that the factor is theirs bit for bit.
template <typename T>
std::vector<float> cutoff_rescale_factors(const Params& P, const torch::Tensor& base,
                                          const std::vector<torch::Tensor>& experts, WorkItems items, int64_t cols);

}  // namespace merge_engine::task_vectors
