// The keep rules of the sparsification modes (sparsify.cpp): which elements of an expert survive.
#pragma once

#include <cstdint>

#include "fused_merge.h"

namespace merge_engine::task_vectors {

// Which elements of [start, start + len) of expert i survive its sparsification: keep[j] for element
// start + j, whose delta is d[j] (read by the magnitude, outliers and rank modes). row_cols: the
// length of a row (rank mode: the item is one row); scratch_p: room for len floats.
template <typename T>
void keep_flags(const Params& P, int i, const T* d, int64_t start, int64_t len, int64_t row_cols,
                uint8_t* keep, float* scratch_p);

}  // namespace merge_engine::task_vectors
