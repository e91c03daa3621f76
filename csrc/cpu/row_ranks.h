// DELLA's per-row ranks (row_ranks.cpp): keep probabilities from the stable magnitude order of a row.
#pragma once

#include <cstdint>

namespace merge_engine::task_vectors {

// DELLA keep probabilities of one row of |delta| (ops/sparsify.py: della_keep_probability).
template <typename T> void rank_probabilities(const T* d, int64_t cols, double density, double epsilon, float* p);

}  // namespace merge_engine::task_vectors
