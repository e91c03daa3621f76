// DELLA's ranks within rows on the GPU: a stable segmented radix sort (cub) of each row's keys, in
// chunks of rows, then each element's draw against the keep probability of its rank.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"
#include "magnitude_keys.cuh"
#include "row_ranks.cuh"

namespace merge_engine::task_vectors {

namespace {

constexpr int64_t kSortChunk = int64_t{1} << 24;  // elements per segmented sort of DELLA rows

template <typename D, typename Key>
__global__ void della_keys_kernel(const D* e, const D* b, int64_t start, int64_t len, int cols, Key* keys, int* cols_idx) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < len;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[s] = static_cast<Key>(delta_key<D>(e, b, start + s));
    cols_idx[s] = static_cast<int>(s % cols);
  }
}

__global__ void row_offsets_kernel(int* offsets, int rows, int cols) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r <= rows; r += gridDim.x * blockDim.x) offsets[r] = r * cols;
}

// Sorted position s of the chunk holds, in its row, ascending rank s % cols; its element draws
// u < p with p = rank / max(cols - 1, 1) * 2 eps + (density - eps) (ops/sparsify.py).
__global__ void della_keep_kernel(int64_t start, int64_t len, int cols, const int* sorted_cols, float denom,
                                  float scale, float base_p, uint32_t stream, uint32_t key0, uint32_t key1,
                                  uint8_t* keep) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < len;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = s / cols, rank = s % cols;
    const int64_t g = start + row * cols + sorted_cols[s];
    float u[4];
    uniform4(static_cast<uint64_t>(g >> 2), stream, key0, key1, u);
    const float p = (static_cast<float>(rank) / denom) * scale + base_p;
    keep[g] = u[g & 3] < p;
  }
}

}  // namespace

template <typename D>
void della_keep_flags(const D* e, const D* b, int64_t rows, int64_t cols, double density, double epsilon,
                      uint32_t stream_id, uint32_t key0, uint32_t key1, uint8_t* keep,
                      const at::TensorOptions& opts, cudaStream_t stream) {
  using Key = typename Traits<D>::SortKey;
  TORCH_CHECK(cols <= INT32_MAX / 2, "merge_engine CUDA kernel: DELLA rows longer than 2^30 elements");
  const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(rows, kSortChunk / cols));
  const int64_t cap = chunk_rows * cols;
  auto key_opts = opts.dtype(sizeof(Key) == 2 ? at::kShort : at::kInt);
  auto keys_in = at::empty({cap}, key_opts), keys_out = at::empty({cap}, key_opts);
  auto idx_in = at::empty({cap}, opts.dtype(at::kInt)), idx_out = at::empty({cap}, opts.dtype(at::kInt));
  auto offsets = at::empty({chunk_rows + 1}, opts.dtype(at::kInt));
  Key* kin = reinterpret_cast<Key*>(keys_in.data_ptr());
  Key* kout = reinterpret_cast<Key*>(keys_out.data_ptr());
  int* iin = idx_in.data_ptr<int>();
  int* iout = idx_out.data_ptr<int>();
  int* offs = offsets.data_ptr<int>();
  const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
  const float scale = static_cast<float>(2.0 * epsilon);     // the reference's 2 * epsilon, in fp32
  const float base_p = static_cast<float>(density - epsilon);  // the reference's density - epsilon, in fp32
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t rc = std::min(chunk_rows, rows - r0), len = rc * cols, start = r0 * cols;
    const int grid = grid_for(len, kThreads);
    della_keys_kernel<D, Key><<<grid, kThreads, 0, stream>>>(e, b, start, len, static_cast<int>(cols), kin, iin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_offsets_kernel<<<grid_for(rc + 1, kThreads), kThreads, 0, stream>>>(offs, static_cast<int>(rc), static_cast<int>(cols));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        nullptr, temp_bytes, kin, kout, iin, iout, static_cast<int>(len), static_cast<int>(rc), offs, offs + 1, 0,
        Traits<D>::kKeyBits, stream));
    auto temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, kin, kout, iin, iout, static_cast<int>(len), static_cast<int>(rc), offs,
        offs + 1, 0, Traits<D>::kKeyBits, stream));
    della_keep_kernel<<<grid, kThreads, 0, stream>>>(start, len, static_cast<int>(cols), iout, denom, scale, base_p,
                                                     stream_id, key0, key1, keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define INSTANTIATE(D)                                                                                        \
  template void della_keep_flags<D>(const D*, const D*, int64_t, int64_t, double, double, uint32_t, uint32_t, \
                                    uint32_t, uint8_t*, const at::TensorOptions&, cudaStream_t);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
