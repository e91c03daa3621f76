// Radix select, the fallback of the bracketed select (bracketed_select.cpp): the cut-off (T, c) of the
// first `count` elements of the stable order of the keys of |expert - base| (ops/select.py). Keys have
// 15 (16-bit types) or 31 (fp32) significant bits: one histogram pass per 16 bits, then, only if the
// cut-off key is shared by more elements than the selection needs, one parallel pass counting equal
// keys per chunk and a scan of one chunk.
// NaN/Inf are not checked here (their keys stay in range); the fused merge pass reports them.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "magnitude_keys.h"
#include "radix_select.h"

namespace merge_engine::task_vectors {

namespace {

template <typename T, typename KeyFn>
std::vector<int64_t> histogram(int64_t n, int bins, KeyFn bin_of) {
  int threads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(threads, std::vector<int64_t>(bins, 0));
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    auto& h = local[at::get_thread_num()];
    for (int64_t i = lo; i < hi; ++i) {
      int b = bin_of(i);
      if (b >= 0) ++h[b];
    }
  });
  std::vector<int64_t> total(bins, 0);
  for (auto& h : local)
    for (int b = 0; b < bins; ++b) total[b] += h[b];
  return total;
}

// The bin holding ascending rank r (0-based): (bin, elements below it, elements in it).
std::array<int64_t, 3> bin_of_rank(const std::vector<int64_t>& hist, int64_t r) {
  int64_t below = 0;
  for (size_t b = 0; b < hist.size(); ++b) {
    if (below + hist[b] > r) return {static_cast<int64_t>(b), below, hist[b]};
    below += hist[b];
  }
  TORCH_CHECK(false, "radix select: rank out of range");
}

// Index just past the need-th element (in index order) whose key is t: per-chunk counts in
// parallel (count_equal(lo, hi): elements of [lo, hi) whose key is t), then a scan of the one chunk
// where the count is reached. Bf16 deltas tie at the cut-off key almost always (128 mantissas per
// binade), so this pass is as hot as the histogram.
template <typename CountFn, typename KeyFn>
int64_t index_after_nth_equal(int64_t n, int64_t t, int64_t need, CountFn count_equal, KeyFn key) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> per(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) per[c] = count_equal(c * kChunk, std::min(n, (c + 1) * kChunk));
  });
  int64_t seen = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    if (seen + per[c] < need) { seen += per[c]; continue; }
    for (int64_t i = c * kChunk; i < n; ++i)
      if (key(i) == t && ++seen == need) return i + 1;
  }
  TORCH_CHECK(false, "radix select: tie count mismatch");
}

// The 2^15-bin histogram of the keys of |expert - base| for 16-bit types, the hot loop of TIES: keys
// are formed a chunk at a time (a loop the compiler vectorises), then counted into four interleaved
// uint32 histograms per thread, so runs of equal keys (common: deltas cluster in a few binades) do
// not serialise on one counter's store-to-load latency.
template <typename T> std::vector<int64_t> delta_key_histogram16(const T* e, const T* b, int64_t n) {
  constexpr int64_t kBins = 1 << 15, kWays = 4, kChunk = 4096;
  const int threads = at::get_num_threads();
  std::vector<std::vector<uint32_t>> local(threads);
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    auto& mine = local[at::get_thread_num()];
    if (mine.empty()) mine.assign(kWays * kBins, 0);
    uint32_t* h = mine.data();
    uint16_t keys[kChunk];
    for (int64_t s = lo; s < hi; s += kChunk) {
      const int64_t len = std::min(kChunk, hi - s);
      const T* __restrict__ es = e + s;
      const T* __restrict__ bs = b + s;
      for (int64_t j = 0; j < len; ++j) keys[j] = static_cast<uint16_t>(key_of<T>(delta_of<T>(es[j], bs[j])));
      int64_t j = 0;
      for (; j + kWays <= len; j += kWays) {
        ++h[keys[j]];
        ++h[kBins + keys[j + 1]];
        ++h[2 * kBins + keys[j + 2]];
        ++h[3 * kBins + keys[j + 3]];
      }
      for (; j < len; ++j) ++h[keys[j]];
    }
  });
  std::vector<int64_t> total(kBins, 0);
  for (auto& h : local)
    if (!h.empty())
      for (int64_t w = 0; w < kWays; ++w)
        for (int64_t k = 0; k < kBins; ++k) total[k] += h[w * kBins + k];
  return total;
}

}  // namespace

template <typename T>
std::array<int64_t, 2> cutoff_by_histogram(const T* e, const T* b, int64_t n, int64_t count, bool largest) {
  count = std::min(std::max<int64_t>(count, 0), n);
  if (count == 0) return {largest ? kNothingLargest : kNothingSmallest, 0};
  if (count == n) return {largest ? kNothingSmallest : kNothingLargest, 0};  // every key is beyond it
  auto key = [&](int64_t i) { return delta_key(e, b, i); };
  const int64_t r = largest ? n - count : count - 1;  // ascending rank of the cut-off element
  int64_t t, below, equal;
  if (sizeof(T) == 2) {
    // uint32 counters: a thread counts at most n elements
    auto hist = n < (int64_t{1} << 32) ? delta_key_histogram16<T>(e, b, n)
                                       : histogram<T>(n, 1 << 15, [&](int64_t i) { return static_cast<int>(key(i)); });
    auto [bin, lower, in_bin] = bin_of_rank(hist, r);
    t = bin, below = lower, equal = in_bin;
  } else {
    auto high = histogram<T>(n, 1 << 16, [&](int64_t i) { return static_cast<int>(key(i) >> 15); });
    auto [hbin, hbelow, hcount] = bin_of_rank(high, r);
    auto low = histogram<T>(n, 1 << 15, [&](int64_t i) {
      int64_t k = key(i);
      return (k >> 15) == hbin ? static_cast<int>(k & 0x7FFF) : -1;
    });
    auto [lbin, lbelow, lcount] = bin_of_rank(low, r - hbelow);
    t = (hbin << 15) | lbin, below = hbelow + lbelow, equal = lcount;
  }
  // Keys equal to t fill ascending ranks [below, below + equal); the selection takes `need` of them,
  // the first in index order.
  const int64_t need = largest ? count - (n - below - equal) : count - below;
  if (need == equal) return {t, n};
  auto count_equal = [&](int64_t lo, int64_t hi) {
    int64_t c = 0;
    if (sizeof(T) == 2) {  // keys a block at a time, then a compare-and-add: both loops vectorise
      uint16_t keys[4096];
      for (int64_t s = lo; s < hi; s += 4096) {
        const int64_t len = std::min<int64_t>(4096, hi - s);
        for (int64_t j = 0; j < len; ++j) keys[j] = static_cast<uint16_t>(key_of<T>(delta_of<T>(e[s + j], b[s + j])));
        for (int64_t j = 0; j < len; ++j) c += keys[j] == t;
      }
    } else {
      for (int64_t i = lo; i < hi; ++i) c += key(i) == t;
    }
    return c;
  };
  return {t, index_after_nth_equal(n, t, need, count_equal, key)};
}

#define INSTANTIATE(T) \
  template std::array<int64_t, 2> cutoff_by_histogram<T>(const T*, const T*, int64_t, int64_t, bool);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
