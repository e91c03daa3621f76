// Radix select on the GPU: the cut-off (T, c) of the first `count` elements of the stable order of
// the keys of |expert - base| (ops/select.py), with histograms read back to the host (see
// radix_select.cuh). NaN/Inf are not checked here (their keys stay in range): the entry point checks
// delta_cutoffs' inputs, and the merge pass reports the merge's.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "launch.cuh"
#include "magnitude_keys.cuh"
#include "radix_select.cuh"

namespace merge_engine::task_vectors {

namespace {

constexpr int kHistThreads = 512;

template <typename D>
__global__ void histogram_kernel(const D* e, const D* b, int64_t n, HistSpec spec, unsigned long long* hist) {
  extern __shared__ uint32_t sub[];
  const int lo = blockIdx.y * spec.slice_bins;
  for (int j = threadIdx.x; j < spec.slice_bins; j += blockDim.x) sub[j] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = delta_key<D>(e, b, i);
    if ((key >> spec.filter_shift) != spec.filter_value) continue;
    const int bin = static_cast<int>((key >> spec.shift) & spec.mask) - lo;
    if (bin >= 0 && bin < spec.slice_bins) atomicAdd(sub + bin, 1u);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < spec.slice_bins; j += blockDim.x)
    if (sub[j]) atomicAdd(hist + lo + j, static_cast<unsigned long long>(sub[j]));
}

template <typename D>
__global__ void count_equal_kernel(const D* e, const D* b, int64_t n, int64_t t, int64_t chunk, long long* counts) {
  const int64_t start = blockIdx.x * chunk, end = std::min(n, start + chunk);
  long long c = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) c += delta_key<D>(e, b, i) == t;
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const long long total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// One block: the index of the need-th (1-based) element of [start, end) whose key is t.
template <typename D>
__global__ void find_nth_equal_kernel(const D* e, const D* b, int64_t start, int64_t end, int64_t t, int64_t need,
                                      long long* result) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ long long found;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  int64_t seen = 0;
  for (int64_t tile = start; tile < end; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const int flag = i < end && delta_key<D>(e, b, i) == t;
    int before, total;
    Scan(tmp).ExclusiveSum(flag, before, total);
    if (flag && seen + before + 1 == need) found = i;  // exactly one thread
    seen += total;                                      // block-wide: the loop exit is uniform
    __syncthreads();
    if (seen >= need) break;
  }
  if (threadIdx.x == 0) *result = found;
}

// Find the bin holding ascending rank r (0-based) and the number of elements below that bin.
std::pair<int, int64_t> bin_of_rank(const std::vector<int64_t>& hist, int64_t r) {
  int64_t below = 0;
  for (size_t b = 0; b < hist.size(); ++b) {
    if (below + hist[b] > r) return {static_cast<int>(b), below};
    below += hist[b];
  }
  TORCH_CHECK(false, "radix select: rank out of range");
}

}  // namespace

template <typename D>
std::array<int64_t, 2> CutoffFinder<D>::cutoff(int64_t count, bool largest) {
  const int64_t n = n_;
  count = std::min(std::max<int64_t>(count, 0), n);
  if (count == 0) return {largest ? kNothingLargest : kNothingSmallest, 0};
  if (count == n) return {largest ? kNothingSmallest : kNothingLargest, 0};  // every key is beyond it
  const int64_t r = largest ? n - count : count - 1;  // ascending rank of the cut-off element
  int64_t t, below, equal;
  if (sizeof(D) == 2) {
    if (top_.empty()) top_ = histogram({0, 0x7FFFu, 62, 0, 0}, 1 << 15);
    auto [bin, lower] = bin_of_rank(top_, r);
    t = bin;
    below = lower;
    equal = top_[bin];
  } else {
    if (top_.empty()) top_ = histogram({15, 0xFFFFu, 62, 0, 0}, 1 << 16);
    auto [hbin, hbelow] = bin_of_rank(top_, r);
    auto& low = low_[hbin];
    if (low.empty()) low = histogram({0, 0x7FFFu, 15, hbin, 0}, 1 << 15);
    auto [lbin, lbelow] = bin_of_rank(low, r - hbelow);
    t = (static_cast<int64_t>(hbin) << 15) | lbin;
    below = hbelow + lbelow;
    equal = low[lbin];
  }
  // Elements with key == t fill ascending ranks [below, below + equal); the selection takes the
  // first `need` of them in index order.
  const int64_t need = largest ? count - (n - below - equal) : count - below;
  if (need == equal) return {t, n};
  TORCH_CHECK(need > 0 && need < equal, "radix select: tie count mismatch");
  return {t, nth_equal(t, need) + 1};
}

template <typename D>
std::vector<int64_t> CutoffFinder<D>::histogram(HistSpec spec, int bins) {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  int slice = bins;
  while (slice > 1024 && static_cast<int64_t>(slice) * 4 > optin) slice /= 2;
  spec.slice_bins = slice;
  const size_t smem = static_cast<size_t>(slice) * sizeof(uint32_t);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(histogram_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  auto hist = at::zeros({bins}, opts_.dtype(at::kLong));
  dim3 grid(grid_for(ceil_div(n_, 32), kHistThreads, 1), static_cast<unsigned>(bins / slice));
  histogram_kernel<D><<<grid, kHistThreads, smem, stream_>>>(
      e_, b_, n_, spec, reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return to_host(hist.data_ptr<int64_t>(), static_cast<size_t>(bins), stream_);
}

template <typename D>
int64_t CutoffFinder<D>::nth_equal(int64_t t, int64_t need) {
  const int64_t chunk = std::max<int64_t>(4096, ceil_div(ceil_div(n_, 65536), kThreads) * kThreads);
  const int64_t blocks = ceil_div(n_, chunk);
  auto counts = at::empty({blocks}, opts_.dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
  count_equal_kernel<D><<<static_cast<unsigned>(blocks), kThreads, 0, stream_>>>(e_, b_, n_, t, chunk, counts_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto host = to_host(counts_ptr, static_cast<size_t>(blocks), stream_);
  int64_t seen = 0;  // exclusive scan until the block holding the need-th equal key
  for (int64_t blk = 0; blk < blocks; ++blk) {
    if (seen + host[blk] >= need) {
      auto result = at::empty({1}, opts_.dtype(at::kLong));
      auto* result_ptr = reinterpret_cast<long long*>(result.data_ptr<int64_t>());
      find_nth_equal_kernel<D><<<1, kThreads, 0, stream_>>>(e_, b_, blk * chunk, std::min(n_, (blk + 1) * chunk),
                                                            t, need - seen, result_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const long long index = to_host(result_ptr, 1, stream_)[0];
      TORCH_CHECK(index >= 0, "radix select: tie count mismatch");
      return index;
    }
    seen += host[blk];
  }
  TORCH_CHECK(false, "radix select: tie count mismatch");
}

#define INSTANTIATE(D) template class CutoffFinder<D>;
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
