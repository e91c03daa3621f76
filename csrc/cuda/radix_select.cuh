// Radix select on the GPU (radix_select.cu): the cut-off (T, c) of the first `count` elements of the
// stable order of the keys of |expert - base| (ops/select.py). 15-bit keys (16-bit types): one
// 32768-bin histogram; 31-bit keys (fp32): 65536 bins of the high 16 bits, then 32768 bins of the low
// 15 bits of the keys in the chosen high bin. Only if the cut-off key is shared by more elements than
// the selection needs, per-block counts of equal keys locate the block of the cut, and one block finds
// the index.
#pragma once

#include <c10/core/TensorOptions.h>

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <vector>

namespace merge_engine::task_vectors {

// One histogram pass over the keys of |expert - base|.
struct HistSpec {
  int shift;             // bin = (key >> shift) & mask
  uint32_t mask;
  int filter_shift;      // only keys with (key >> filter_shift) == filter_value count
  int64_t filter_value;
  int slice_bins;        // bins held by one block's shared sub-histogram (blockIdx.y: the slice)
};

// Cut-offs of one (base, expert) pair; histograms are shared by every count asked of it.
template <typename D>
class CutoffFinder {
 public:
  CutoffFinder(const D* e, const D* b, int64_t n, at::TensorOptions device_options, cudaStream_t stream)
      : e_(e), b_(b), n_(n), opts_(device_options), stream_(stream) {}

  // The cut-off (T, c) of the first `count` elements (descending when largest, else ascending).
  std::array<int64_t, 2> cutoff(int64_t count, bool largest);

 private:
  std::vector<int64_t> histogram(HistSpec spec, int bins);
  int64_t nth_equal(int64_t t, int64_t need);

  const D* e_;
  const D* b_;
  int64_t n_;
  at::TensorOptions opts_;
  cudaStream_t stream_;
  std::vector<int64_t> top_;
  std::map<int, std::vector<int64_t>> low_;
};

}  // namespace merge_engine::task_vectors
