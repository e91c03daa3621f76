// The fused merge of the task-vector family (fused_merge.cpp): its parameters and work items, shared
// with the passes before it (sparsify.cpp, rescale.cpp).
#pragma once

#include <torch/extension.h>

#include <array>
#include <cstdint>
#include <vector>

#include "../task_vectors.h"

namespace merge_engine::task_vectors {

constexpr int64_t kBlock = 2048;  // elements per work item of the fused pass

// What the merge does, as the entry point and the passes before the merge fill it in.
struct Params {
  int mode;
  bool consensus, normalize, rescale;
  float lambda;
  uint32_t key0, key1;
  std::vector<float> weights;           // already rounded to T, as torch.tensor(weights, dtype=T)
  std::vector<std::array<int64_t, 4>> cuts;  // magnitude / outliers
  std::vector<double> densities;        // random, rank (kept in double: DELLA offsets round once)
  std::vector<double> epsilons;         // rank
  std::vector<float> factors;           // L1 rescale per expert (1: none)
  float divisor;                        // normalize without consensus: sum of weights in T (tiny -> 1)
};

// The work items of both passes: elements [item * span, + span), a whole row in rank mode (DELLA
// ranks within rows; a 1-D tensor is one row), else kBlock elements.
struct WorkItems {
  int64_t span, count;
};
inline WorkItems work_items(int mode, int64_t n, int64_t rows, int64_t cols) {
  return mode == kRank ? WorkItems{cols, rows} : WorkItems{kBlock, (n + kBlock - 1) / kBlock};
}

constexpr int64_t kItemsPerChunk = 16;  // work items a thread takes at a time (parallel.h)

// The random and rank modes draw keep flags per item before the merge (the others test cut-offs).
inline bool draws_keep_flags(int mode) { return mode == kRandom || mode == kRank; }
inline int64_t bytes_per_item(int64_t span) { return (span + 7) / 8; }  // one item's flags as bits

// Merges experts into out (the base's shape and dtype): P as the entry point fills it (weights,
// cut-offs, densities, epsilons); the rescale factors and divisor are formed here.
template <typename T>
void merge_typed(Params& P, const torch::Tensor& base, const std::vector<torch::Tensor>& experts, torch::Tensor& out);

}  // namespace merge_engine::task_vectors
