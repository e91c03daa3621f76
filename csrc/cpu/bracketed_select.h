// Bracketed select (bracketed_select.cpp): the exact cut-offs of every expert of a merge in one
// vectorised pass over the inputs.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace merge_engine::task_vectors {

// cutoffs[i][j]: the cut-off (T, c) of the first counts[i][j] elements of the stable order of the
// keys of |experts[i] - b| (descending when largest, else ascending), over n elements.
template <typename T>
std::vector<std::vector<std::array<int64_t, 2>>> delta_cutoffs(const T* b, const std::vector<const T*>& experts,
                                                               int64_t n, const std::vector<std::vector<int64_t>>& counts,
                                                               bool largest);

}  // namespace merge_engine::task_vectors
