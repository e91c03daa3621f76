// Radix select (radix_select.cpp), the exact fallback of the bracketed select (bracketed_select.cpp).
#pragma once

#include <array>
#include <cstdint>

namespace merge_engine::task_vectors {

// The cut-off (T, c) of the first `count` elements of the stable order of the keys of |e - b|, over
// n elements (descending when largest, else ascending).
template <typename T>
std::array<int64_t, 2> cutoff_by_histogram(const T* e, const T* b, int64_t n, int64_t count, bool largest);

}  // namespace merge_engine::task_vectors
