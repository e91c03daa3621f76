// CPU entry points of the task-vector family (bound in bindings.cpp): exact magnitude cut-offs, the
// Philox uniforms of DARE and DELLA, and the fused merge of K task vectors (TIES, DARE, breadcrumbs,
// DELLA, task arithmetic) in one pass. Each checks its arguments (../task_vectors.h) and dispatches on
// the dtype to the algorithms, a file each:
//   bracketed_select.cpp  every expert's cut-offs in one vectorised pass over the inputs,
//   radix_select.cpp      the exact fallback where the bracketed select's sample misled it,
//   fused_merge.cpp       the merge pass, 16 lanes at a time (simd.h), with
//   sparsify.cpp          the keep rule of each sparsification mode (row_ranks.cpp: DELLA's ranks;
//                         philox.h: DARE's and DELLA's draws),
//   rescale.cpp           mergekit's L1 rescale, a pass before the merge (bit_packing.h: the keep
//                         flags it draws, kept for the merge);
// magnitude_keys.h holds the keys they order elements by. A TIES merge reads its inputs twice: one
// vectorised pass finds every expert's cut-off (bracketed select; radix select when the bracket
// misses), then the fused pass merges.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "../task_vectors.h"
#include "bracketed_select.h"
#include "dtypes.h"
#include "fused_merge.h"
#include "magnitude_keys.h"
#include "memory.h"
#include "philox.h"

namespace merge_engine {

torch::Tensor delta_cutoffs_cpu(const torch::Tensor& base, const torch::Tensor& expert,
                                const std::vector<int64_t>& counts, bool largest) {
  check_task_vector_inputs(base, {expert}, c10::DeviceType::CPU);
  auto result = torch::empty({static_cast<int64_t>(counts.size()), 2}, torch::kInt64);
  auto r = result.accessor<int64_t, 2>();
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    // no delta is NaN then (an Inf expert value is an Inf magnitude, as ops/select.py orders it)
    task_vectors::check_finite<scalar_t>(base.data_ptr<scalar_t>(), base.numel(), "the base");
    task_vectors::check_finite<scalar_t>(expert.data_ptr<scalar_t>(), base.numel(), "the expert",
                                         /*allow_inf=*/true);
    const scalar_t* e = expert.data_ptr<scalar_t>();
    auto cuts =
        task_vectors::delta_cutoffs<scalar_t>(base.data_ptr<scalar_t>(), {e}, base.numel(), {counts}, largest)[0];
    for (size_t j = 0; j < counts.size(); ++j) r[j][0] = cuts[j][0], r[j][1] = cuts[j][1];
  });
  return result;
}

torch::Tensor philox_uniforms_cpu(int64_t start, int64_t numel, int64_t stream, int64_t key0, int64_t key1) {
  check_philox_uniforms_args(start, numel);
  const int64_t first = start >> 2, groups = ((start + numel + 3) >> 2) - first;
  std::vector<float> u(static_cast<size_t>(groups) * 4);
  task_vectors::uniforms(first, groups, static_cast<uint32_t>(stream), static_cast<uint32_t>(key0),
                         static_cast<uint32_t>(key1), u.data());
  auto out = torch::empty({numel}, torch::kFloat32);
  std::copy(u.begin() + (start & 3), u.begin() + (start & 3) + numel, out.data_ptr<float>());
  return out;
}

torch::Tensor merge_task_vectors_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& experts,
                                     const std::vector<double>& weights, int64_t mode,
                                     const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                     const std::vector<double>& densities, const std::vector<double>& epsilons,
                                     bool consensus, bool normalize, bool rescale, double lambda,
                                     int64_t key0, int64_t key1, const std::optional<torch::Tensor>& out_buffer) {
  check_merge_task_vectors_args(base, experts, weights, mode, counts_lo, counts_hi, densities, epsilons,
                                c10::DeviceType::CPU);
  const size_t K = experts.size();
  task_vectors::Params P{static_cast<int>(mode), consensus, normalize, rescale, static_cast<float>(lambda),
                         static_cast<uint32_t>(key0), static_cast<uint32_t>(key1)};
  std::vector<torch::Tensor> inputs(experts);
  inputs.push_back(base);
  auto out = output_for(out_buffer, base, inputs);
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const bool by_cutoffs = mode == kMagnitude || mode == kOutliers;
    std::vector<const scalar_t*> e;
    std::vector<std::vector<int64_t>> counts(K);
    for (size_t i = 0; i < K; ++i) {
      P.weights.push_back(to_f(round_to<scalar_t>(static_cast<float>(weights[i]))));
      P.densities.push_back(densities[i]);
      P.epsilons.push_back(epsilons.empty() ? 0.0 : epsilons[i]);
      e.push_back(experts[i].data_ptr<scalar_t>());
      if (by_cutoffs) counts[i] = {counts_lo[i], counts_hi[i]};
    }
    auto cuts = task_vectors::delta_cutoffs<scalar_t>(base.data_ptr<scalar_t>(), e, base.numel(), counts,
                                                      mode == kMagnitude);
    for (size_t i = 0; i < K; ++i)
      P.cuts.push_back(by_cutoffs ? std::array<int64_t, 4>{cuts[i][0][0], cuts[i][0][1], cuts[i][1][0], cuts[i][1][1]}
                                  : std::array<int64_t, 4>{kNothingLargest, 0, kNothingLargest, 0});
    task_vectors::merge_typed<scalar_t>(P, base, experts, out);
  });
  return out;
}

}  // namespace merge_engine
