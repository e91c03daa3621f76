// Launch helpers of the task-vector family's CUDA kernels: block size, grid size and the synchronising
// copies back to the host.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dtypes.cuh"

namespace merge_engine::task_vectors {

constexpr int kThreads = 256;

inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Grid-stride launches: enough blocks to fill the device (per_sm per multiprocessor), no more than the work needs.
inline int grid_for(int64_t work_items, int threads, int per_sm = 8) {
  const int64_t cap = static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount)) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(work_items, threads), cap)));
}

// count values from the device, after the stream's work so far (a synchronising copy).
template <typename V> std::vector<V> to_host(const V* device_ptr, size_t count, cudaStream_t stream) {
  std::vector<V> host(count);
  if (count) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host.data(), device_ptr, count * sizeof(V), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  return host;
}

}  // namespace merge_engine::task_vectors
