// DELLA's ranks within rows on the GPU (row_ranks.cu): the keep flags of an expert's draws.
#pragma once

#include <c10/core/TensorOptions.h>

#include <cuda_runtime.h>

#include <cstdint>

namespace merge_engine::task_vectors {

// keep[g] for each element g of the rows x cols tensor of expert e (base b): u < p, with p from the
// element's stable rank within its row (ops/sparsify.py) and u its Philox uniform of stream stream_id.
template <typename D>
void della_keep_flags(const D* e, const D* b, int64_t rows, int64_t cols, double density, double epsilon,
                      uint32_t stream_id, uint32_t key0, uint32_t key1, uint8_t* keep,
                      const at::TensorOptions& opts, cudaStream_t stream);

}  // namespace merge_engine::task_vectors
