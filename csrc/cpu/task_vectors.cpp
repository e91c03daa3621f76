// CPU kernels of the task-vector family: exact magnitude cut-offs, and the fused merge of K task
// vectors (TIES, DARE, breadcrumbs, DELLA, task arithmetic) in one pass. A TIES merge reads its
// inputs twice: one vectorised pass finds every expert's cut-off (bracketed select; radix select when
// the bracket misses), then the fused pass merges, 16 lanes at a time (simd.h).
//
// Every arithmetic step rounds to the compute dtype T exactly where the PyTorch reference
// (merge_engine/ops/consensus.py: merge_task_vectors) rounds, and sums over experts run in float
// in expert order as torch's dim-0 reductions do; so outputs are bit-identical to the reference
// except for the L1 rescale factor, whose whole-tensor sums are taken in a different order.
// Built with -ffp-contract=off: a fused multiply-add would round differently from torch.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "../task_vectors.h"
#include "dtypes.h"
#include "memory.h"
#include "simd.h"

namespace merge_engine {
namespace {

constexpr int64_t kBlock = 2048;  // elements per work item of the fused pass

template <typename T> int64_t key_of(T x);
template <> int64_t key_of<float>(float x) { return key_of_float(x); }
template <> int64_t key_of<c10::BFloat16>(c10::BFloat16 x) { return key_of_bits16(x.x); }
template <> int64_t key_of<c10::Half>(c10::Half x) { return key_of_bits16(x.x); }

template <typename T> int64_t inf_key();
template <> int64_t inf_key<float>() { return kInfKey32; }
template <> int64_t inf_key<c10::BFloat16>() { return kInfKey16BFloat; }
template <> int64_t inf_key<c10::Half>() { return kInfKey16Half; }

// The delta as the reference forms it: expert - base in T (computed in float, rounded once).
template <typename T> T delta_of(T e, T b) { return round_to<T>(to_f(e) - to_f(b)); }
template <> float delta_of<float>(float e, float b) { return e - b; }

// The magnitude key of element i of expert - base.
template <typename T> int32_t delta_key(const T* e, const T* b, int64_t i) {
  return static_cast<int32_t>(key_of<T>(delta_of<T>(e[i], b[i])));
}

// ---------------------------------------------------------------------------------------------
// Radix select, the fallback of the bracketed select below: the cut-off (T, c) of the first `count`
// elements of the stable order of the keys of |expert - base| (ops/select.py). Keys have 15 (16-bit
// types) or 31 (fp32) significant bits: one histogram pass per 16 bits, then, only if the cut-off key
// is shared by more elements than the selection needs, one parallel pass counting equal keys per
// chunk and a scan of one chunk.
// NaN/Inf are not checked here (their keys stay in range); the fused merge pass reports them.
// ---------------------------------------------------------------------------------------------
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

// NaN or Inf in x raise ValueError; with allow_inf, only NaN (+-Inf are the largest magnitudes).
template <typename T> void check_finite(const T* x, int64_t n, const char* what, bool allow_inf = false) {
  std::vector<int64_t> bad(at::get_num_threads(), 0);
  const int64_t limit = inf_key<T>() + (allow_inf ? 1 : 0);  // NaN keys are above Inf's
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    int64_t c = 0;
    for (int64_t i = lo; i < hi; ++i) c += key_of<T>(x[i]) >= limit;
    bad[at::get_thread_num()] += c;
  });
  int64_t total = std::accumulate(bad.begin(), bad.end(), int64_t{0});
  TORCH_CHECK_VALUE(total == 0, what, " has ", total, allow_inf ? " NaN" : " NaN or Inf",
                    " value(s); a magnitude ordering is undefined");
}

// ---------------------------------------------------------------------------------------------
// Bracketed select, the fast path for every cut-off of every expert: a sample of each expert's keys
// brackets its cut-off rank between two keys lo <= hi; one vectorised pass (a chunk of all experts at
// a time, so the base chunk is read from memory once) then counts, per chunk, the keys below lo, equal
// to lo and equal to hi, and lists the few keys strictly between them (in index order). The cut-off
// key T follows from these alone, and its tie index c from a rescan of the one chunk where it falls.
// When the sample misled (the rank is outside the bracket, or the list outgrew its budget) the radix
// select above finds that cut-off instead. Both give the reference's (T, c): the bracket only decides
// how fast.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSelectChunk = 1 << 16;

struct CutoffQuery {  // the first `count` elements of expert i's stable order
  int expert;
  int64_t count, rank;  // rank: ascending rank of the cut-off element
  int32_t lo, hi;       // the bracket (keys)
  std::array<int64_t, 2> cutoff;
  bool found;
};

struct ChunkTally {  // one query over one chunk
  int64_t below = 0, at_lo = 0, at_hi = 0, inside = 0;
  std::vector<int32_t> listed;   // the keys with lo < key < hi, in index order
  bool complete = false;         // listed holds every such element of the chunk
};

// The sample: runs of kSampleRun consecutive elements (whole cache lines) spread evenly over the
// tensor, a quarter of it up to kMaxSampleRuns runs (1/64 of 16M elements), at least kMinSampleRuns,
// or every element of a small tensor. A sample that large brackets a cut-off within one or two bf16
// keys from 1M elements on, so the tally below lists almost nothing and skips its compaction for
// nearly every vector; sampling (vectorised, a few cache lines at a time) costs far less.
constexpr int64_t kSampleRun = 32, kMinSampleRuns = 512, kMaxSampleRuns = 8192, kSampleEvery = 4;

int64_t sample_runs(int64_t n) { return std::clamp(n / (kSampleEvery * kSampleRun), kMinSampleRuns, kMaxSampleRuns); }

// The keys of elements [start, start + len), kWidth at a time (in the lanes' order within each group
// of kWidth: the sample's uses ignore the order within a run).
template <typename T> void delta_keys(const T* e, const T* b, int64_t start, int64_t len, int32_t* out) {
  using namespace simd;
  using L = Lanes<T>;
  int64_t j = 0;
  for (; j + kWidth <= len; j += kWidth) store(out + j, L::key(L::round(sub(L::load(e + start + j), L::load(b + start + j)))));
  for (; j < len; ++j) out[j] = delta_key(e, b, start + j);
}

template <typename T> std::vector<int32_t> sample_keys(const T* e, const T* b, int64_t n) {
  const int64_t runs = sample_runs(n);
  if (n <= runs * kSampleRun) {
    std::vector<int32_t> sample(n);
    delta_keys(e, b, 0, n, sample.data());
    return sample;
  }
  std::vector<int32_t> sample(runs * kSampleRun);
  for (int64_t r = 0; r < runs; ++r) delta_keys(e, b, r * (n - kSampleRun) / (runs - 1), kSampleRun, &sample[r * kSampleRun]);
  return sample;
}

// The keys at ascending ranks of a sample: a count per key for 16-bit types, nth_element on a copy
// for float32 keys.
class SampleOrder {
 public:
  SampleOrder(const std::vector<int32_t>& sample, bool narrow) : sorted_(narrow ? 0 : sample.size()) {
    if (narrow) {
      cumulative_.assign(1 << 15, 0);
      for (int32_t k : sample) ++cumulative_[k];
      std::partial_sum(cumulative_.begin(), cumulative_.end(), cumulative_.begin());
    } else {
      std::copy(sample.begin(), sample.end(), sorted_.begin());
    }
  }
  int32_t at(int64_t rank) {
    if (!cumulative_.empty())
      return static_cast<int32_t>(std::upper_bound(cumulative_.begin(), cumulative_.end(), rank) - cumulative_.begin());
    std::nth_element(sorted_.begin(), sorted_.begin() + rank, sorted_.end());
    return sorted_[rank];
  }

 private:
  std::vector<int64_t> cumulative_;  // elements with key <= k
  std::vector<int32_t> sorted_;
};

// The bracket of each query: the sample keys 8 standard deviations of the sample rank (plus 16)
// either side of the rank's position in the sample, or no bound on a side where that passes the
// sample's end. The deviation is the larger of the binomial one (independent elements) and the one
// measured between runs: keys within a run are correlated (rows of a weight matrix differ in scale),
// which widens the spread of a run-sampled rank by up to sqrt(run length).
template <typename T>
void bracket_queries(const T* e, const T* b, int64_t n, std::vector<CutoffQuery*>& queries) {
  const std::vector<int32_t> sample = sample_keys(e, b, n);
  const int64_t s = static_cast<int64_t>(sample.size());
  SampleOrder order(sample, sizeof(T) == 2);
  const int32_t key_end = sizeof(T) == 2 ? 0x8000 : INT32_MAX;  // keys are >= 0 and < key_end
  for (auto* q : queries) {
    const double p = (q->rank + 0.5) / n, at = p * s;
    double variance = s * p * (1 - p);
    if (s < n) {  // between runs: the runs' counts of keys below the estimate
      const int32_t estimate = order.at(std::clamp<int64_t>(static_cast<int64_t>(at), 0, s - 1));
      const int64_t runs = s / kSampleRun;
      double sum = 0, sum2 = 0;
      for (int64_t r = 0; r < runs; ++r) {
        int64_t c = 0;
        for (int64_t j = r * kSampleRun; j < (r + 1) * kSampleRun; ++j) c += sample[j] < estimate;
        sum += c, sum2 += static_cast<double>(c) * c;
      }
      variance = std::max(variance, sum2 - sum * sum / runs);  // runs x the variance of one run's count
    }
    const double spread = 8 * std::sqrt(variance) + 16;
    const int64_t lo = std::clamp<int64_t>(static_cast<int64_t>(at - spread), 0, s - 1);
    const int64_t hi = std::clamp<int64_t>(static_cast<int64_t>(at + spread) + 1, 0, s - 1);
    q->lo = lo == 0 ? -1 : order.at(lo);
    q->hi = hi == s - 1 ? key_end : order.at(hi);
  }
}

// One chunk of one expert against NQ of its queries (two: breadcrumbs' window). Four counts per
// query, each one comparison: keys below lo, above lo, below hi, above hi; the tally's counts follow
// from them (equal = all - below - above). 16-bit types count in int16 lanes (keys shifted down by
// one, so that the open bound hi = 2^15 fits), 16 keys per register; a chunk's 2^16 elements put at
// most 2^12 in a lane. The few keys strictly inside the bracket are listed,
// compacted into the thread's scratch and copied to the tally; only keys: the one tie index a query
// may need is found by rescanning the one chunk where it falls.
template <typename T, int NQ>
void tally_chunk(const T* e, const T* b, int64_t start, int64_t len, CutoffQuery* const* qs,
                 ChunkTally* const* tallies, bool list) {
  using namespace simd;
  using L = Lanes<T>;
  constexpr bool kNarrow = sizeof(T) == 2;
  using C = std::conditional_t<kNarrow, I16, I>;  // counting lanes
  auto counted = [](F d) ME_ALWAYS_INLINE {  // the key of round(d) in counting lanes
    if constexpr (kNarrow) return sub(L::key16(d), set16(1)); else return L::key(L::round(d));
  };
  auto bound = [](int32_t k) {
    if constexpr (kNarrow) return set16(static_cast<int16_t>(k - 1)); else return iset(k);
  };
  auto zero = [] { if constexpr (kNarrow) return set16(0); else return iset(0); };
  thread_local std::vector<int32_t> scratch;
  scratch.resize(static_cast<size_t>(NQ) * (kSelectChunk + kWidth));
  int32_t* keys[NQ];
  int64_t kept[NQ];
  C lo[NQ], hi[NQ], below_lo[NQ], above_lo[NQ], below_hi[NQ], above_hi[NQ];
  for (int q = 0; q < NQ; ++q) {
    lo[q] = bound(qs[q]->lo), hi[q] = bound(qs[q]->hi);
    below_lo[q] = above_lo[q] = below_hi[q] = above_hi[q] = zero();
    keys[q] = scratch.data() + q * (kSelectChunk + kWidth);
    kept[q] = 0;
  }
  int64_t j = 0;
  for (; j + kWidth <= len; j += kWidth) {
    const F d = sub(L::load(e + start + j), L::load(b + start + j));
    const C k = counted(d);
    for (int q = 0; q < NQ; ++q) {
      const C gt_lo = gt(k, lo[q]), lt_hi = gt(hi[q], k);
      below_lo[q] = sub(below_lo[q], gt(lo[q], k));
      above_lo[q] = sub(above_lo[q], gt_lo);
      below_hi[q] = sub(below_hi[q], lt_hi);
      above_hi[q] = sub(above_hi[q], gt(k, hi[q]));
      // a branch, not a compaction per vector: the sample's narrow bracket leaves almost every
      // vector without a key inside it
      const C in = gt_lo & lt_hi;
      bool some;
      if constexpr (kNarrow) some = any(in); else some = lanes_set(in) != 0;
      if (list && some) {
        const I key = L::key(L::round(d)), in32 = gt(key, iset(qs[q]->lo)) & gt(iset(qs[q]->hi), key);
        kept[q] += compress_store(in32, key, keys[q] + kept[q]);
      }
    }
  }
  for (int q = 0; q < NQ; ++q) {
    int64_t lt_lo = sum(below_lo[q]), gt_lo = sum(above_lo[q]), lt_hi = sum(below_hi[q]), gt_hi = sum(above_hi[q]);
    const int32_t l = qs[q]->lo, h = qs[q]->hi;
    for (int64_t i = start + j; i < start + len; ++i) {  // the last < kWidth elements
      const int32_t key = delta_key(e, b, i);
      lt_lo += key < l, gt_lo += key > l, lt_hi += key < h, gt_hi += key > h;
      if (list && key > l && key < h) keys[q][kept[q]++] = key;
    }
    ChunkTally& t = *tallies[q];
    t.below = lt_lo, t.at_lo = len - lt_lo - gt_lo;
    // a key equal to hi counts there only when hi > lo (else it is lo's)
    t.at_hi = h > l ? len - lt_hi - gt_hi : 0;
    t.inside = h > l ? lt_hi - t.below - t.at_lo : 0;
    t.listed.assign(keys[q], keys[q] + kept[q]);
    t.complete = list;
  }
}

// Index just past the need-th element (index order) with key t, given count(chunk tally): how many
// elements of that chunk have key t.
template <typename T, typename CountFn>
int64_t tie_index_from_counts(const T* e, const T* b, int64_t n, int32_t t, int64_t need,
                              const std::vector<ChunkTally>& tally, CountFn count) {
  for (size_t c = 0; c < tally.size(); ++c) {
    const int64_t here = count(tally[c]);
    if (need > here) { need -= here; continue; }
    // a vector's count of key t first (its lanes' order aside), then its elements in index order
    int32_t keys[simd::kWidth];
    for (int64_t i = c * kSelectChunk, end = std::min(n, i + kSelectChunk); i < end; i += simd::kWidth) {
      const int64_t len = std::min<int64_t>(simd::kWidth, end - i);
      delta_keys(e, b, i, len, keys);
      const int64_t equal = std::count(keys, keys + len, t);
      if (need > equal) { need -= equal; continue; }
      for (int64_t j = i;; ++j)
        if (delta_key(e, b, j) == t && --need == 0) return j + 1;
    }
  }
  TORCH_CHECK(false, "bracketed select: tie count mismatch");
}

// The cut-off from one query's tallies, or false when the bracket missed its rank.
template <typename T>
bool resolve_query(const T* e, const T* b, int64_t n, CutoffQuery& q, const std::vector<ChunkTally>& tally,
                   bool largest) {
  int64_t below = 0, at_lo = 0, at_hi = 0, inside = 0;
  bool listed_all = true;
  for (const auto& t : tally)
    below += t.below, at_lo += t.at_lo, at_hi += t.at_hi, inside += t.inside, listed_all &= t.complete;
  const int64_t r = q.rank;
  // (cut-off key, keys below it, keys equal to it), and how the tie index is found
  int64_t key, less, equal;
  int64_t ChunkTally::*tie_count = nullptr;  // the chunks' counts of the cut-off key, or none: listed
  if (r >= below && r < below + at_lo) {
    key = q.lo, less = below, equal = at_lo, tie_count = &ChunkTally::at_lo;
  } else if (r >= below + at_lo + inside && r < below + at_lo + inside + at_hi) {
    key = q.hi, less = below + at_lo + inside, equal = at_hi, tie_count = &ChunkTally::at_hi;
  } else if (r >= below + at_lo && r < below + at_lo + inside && listed_all) {
    // the listed keys lie strictly between lo and hi: count them per key (16-bit keys span at most
    // 2^15 values), or, for wider float32 brackets, find the key by nth_element over a copy
    int64_t rank = r - below - at_lo;
    if (static_cast<int64_t>(q.hi) - q.lo <= (1 << 16)) {
      std::vector<int64_t> per_key(q.hi - q.lo, 0);
      for (const auto& t : tally)
        for (int32_t v : t.listed) ++per_key[v - q.lo];
      int64_t k = 0;
      while (rank >= per_key[k]) rank -= per_key[k++];
      key = q.lo + k;
      less = below + at_lo + std::accumulate(per_key.begin(), per_key.begin() + k, int64_t{0});
      equal = per_key[k];
    } else {
      std::vector<int32_t> keys;
      keys.reserve(inside);
      for (const auto& t : tally) keys.insert(keys.end(), t.listed.begin(), t.listed.end());
      std::nth_element(keys.begin(), keys.begin() + rank, keys.end());
      key = keys[rank];
      less = below + at_lo, equal = 0;
      for (int32_t v : keys) less += v < key, equal += v == key;
    }
  } else {
    return false;
  }
  const int64_t need = largest ? q.count - (n - less - equal) : q.count - less;
  int64_t c = n;
  if (need < equal) {
    const int32_t t = static_cast<int32_t>(key);
    c = tie_count ? tie_index_from_counts(e, b, n, t, need, tally, [&](const ChunkTally& x) { return x.*tie_count; })
                  : tie_index_from_counts(e, b, n, t, need, tally, [&](const ChunkTally& x) {
                      return static_cast<int64_t>(std::count(x.listed.begin(), x.listed.end(), t));
                    });
  }
  q.cutoff = {key, c};
  return true;
}

// cutoffs[i][j]: the cut-off of the first counts[i][j] elements of expert i's stable order.
template <typename T>
std::vector<std::vector<std::array<int64_t, 2>>> delta_cutoffs(const T* b, const std::vector<const T*>& experts,
                                                               int64_t n, const std::vector<std::vector<int64_t>>& counts,
                                                               bool largest) {
  const int K = static_cast<int>(experts.size());
  std::vector<std::vector<std::array<int64_t, 2>>> result(K);
  std::vector<CutoffQuery> queries;
  for (int i = 0; i < K; ++i) {
    result[i].resize(counts[i].size());
    for (int64_t count : counts[i]) {
      count = std::min(std::max<int64_t>(count, 0), n);
      CutoffQuery q{i, count, largest ? n - count : count - 1, 0, 0, {0, 0}, false};
      if (count == 0) q.cutoff = {largest ? kNothingLargest : kNothingSmallest, 0}, q.found = true;
      if (count == n) q.cutoff = {largest ? kNothingSmallest : kNothingLargest, 0}, q.found = true;
      queries.push_back(q);
    }
  }
  std::vector<std::vector<CutoffQuery*>> open(K);  // per expert, the queries the pass answers
  for (auto& q : queries)
    if (!q.found) open[q.expert].push_back(&q);
  at::parallel_for(0, K, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      if (!open[i].empty()) bracket_queries<T>(experts[i], b, n, open[i]);
  });
  const int64_t chunks = (n + kSelectChunk - 1) / kSelectChunk;
  std::vector<std::vector<ChunkTally>> tally(queries.size(), std::vector<ChunkTally>(chunks));
  // a query stops listing once it has listed n / 16 + 64K keys, so lists stay below ~n / 4 bytes
  const int64_t budget = n / 16 + kSelectChunk;
  std::vector<std::atomic<int64_t>> listed(queries.size());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kSelectChunk, len = std::min(kSelectChunk, n - start);
      for (int i = 0; i < K; ++i)
        for (size_t g = 0; g < open[i].size(); g += 2) {  // two cut-offs (breadcrumbs' window) per read
          const int nq = static_cast<int>(std::min<size_t>(2, open[i].size() - g));
          ChunkTally* t[2];
          bool list = true;
          for (int q = 0; q < nq; ++q) {
            const size_t id = open[i][g + q] - queries.data();
            t[q] = &tally[id][c];
            list &= listed[id].load(std::memory_order_relaxed) < budget;
          }
          if (nq == 2)
            tally_chunk<T, 2>(experts[i], b, start, len, open[i].data() + g, t, list);
          else
            tally_chunk<T, 1>(experts[i], b, start, len, open[i].data() + g, t, list);
          for (int q = 0; q < nq; ++q) listed[open[i][g + q] - queries.data()] += t[q]->inside;
        }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(queries.size()), 1, [&](int64_t q0, int64_t q1) {
    for (int64_t id = q0; id < q1; ++id)
      if (!queries[id].found)
        queries[id].found = resolve_query<T>(experts[queries[id].expert], b, n, queries[id], tally[id], largest);
  });
  size_t id = 0;
  for (int i = 0; i < K; ++i)
    for (size_t j = 0; j < counts[i].size(); ++j, ++id) {
      auto& q = queries[id];
      result[i][j] = q.found ? q.cutoff : cutoff_by_histogram<T>(experts[i], b, n, q.count, largest);
    }
  return result;
}

// ---------------------------------------------------------------------------------------------
// The fused merge.
// ---------------------------------------------------------------------------------------------
struct Params {
  int mode;
  bool consensus, normalize, rescale;
  float lambda;
  uint32_t key0, key1;
  std::vector<float> weights;           // already rounded to T, as torch.tensor(weights, dtype=T)
  std::vector<std::array<int64_t, 4>> cuts;  // magnitude / outliers
  std::vector<double> densities;        // random, rank (kept in double: DELLA offsets round once)
  std::vector<double> epsilons;         // rank
  std::vector<float> factors;           // L1 rescale per expert (NaN: none)
  float divisor;                        // normalize without consensus: sum of weights in T (tiny -> 1)
};

// The indices of d[0, cols) in the stable ascending order of their magnitude keys (ties by index),
// in a thread's scratch. An LSD radix sort, 8 bits a pass (two passes for 16-bit types, four for
// float32), every pass's digit counts taken in one read of the keys, a pass skipped where every key
// shares its digit; each pass is stable, so the whole is. It replaced std::stable_sort with a
// comparison that formed both keys, which held a 1.1B DELLA merge at 7.8x its I/O floor.
template <typename T> const int32_t* stable_key_order(const T* d, int64_t cols) {
  constexpr int kPasses = sizeof(T);
  TORCH_CHECK(cols <= INT32_MAX, "merge_engine: DELLA ranks rows of at most 2^31 - 1 elements, not ", cols);
  thread_local std::vector<uint32_t> key_buffer;
  thread_local std::vector<int32_t> order_buffer;
  key_buffer.resize(2 * static_cast<size_t>(cols));
  order_buffer.resize(2 * static_cast<size_t>(cols));
  uint32_t *keys = key_buffer.data(), *keys_next = keys + cols;
  int32_t *at = order_buffer.data(), *at_next = at + cols;
  std::array<std::array<int64_t, 257>, kPasses> start{};  // start[pass][b + 1]: keys with digit b
  for (int32_t j = 0; j < static_cast<int32_t>(cols); ++j) {
    const uint32_t key = static_cast<uint32_t>(key_of<T>(d[j]));
    keys[j] = key, at[j] = j;
    for (int pass = 0; pass < kPasses; ++pass) ++start[pass][((key >> (8 * pass)) & 0xFF) + 1];
  }
  for (int pass = 0; pass < kPasses; ++pass) {
    auto& first = start[pass];  // then each digit's first slot
    if (std::find(first.begin() + 1, first.end(), cols) != first.end()) continue;
    std::partial_sum(first.begin(), first.end(), first.begin());
    const int shift = 8 * pass;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t slot = first[(keys[j] >> shift) & 0xFF]++;
      keys_next[slot] = keys[j], at_next[slot] = at[j];
    }
    std::swap(keys, keys_next), std::swap(at, at_next);
  }
  return at;
}

// DELLA keep probabilities of one row of |delta| (ops/sparsify.py: della_keep_probability).
template <typename T> void rank_probabilities(const T* d, int64_t cols, double density, double epsilon, float* p) {
  const int32_t* order = stable_key_order(d, cols);
  const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
  const float base = static_cast<float>(density - epsilon);  // as the reference: python floats, rounded once
  const float scale = static_cast<float>(2.0 * epsilon);
  for (int64_t r = 0; r < cols; ++r) p[order[r]] = (static_cast<float>(r) / denom) * scale + base;
}

// keep_by_cutoffs over a block, with the cut-offs in locals and the order fixed at compile time: the
// uint8_t stores may alias anything, so a loop reading cut[] through a pointer reloads it every
// element and does not vectorise.
// Keys (< 2^31) and in-block indices fit 32-bit lanes, twice as many per vector as int64: the cut-off
// keys are clamped to [-1, 2^31 - 1] (same comparisons against any key: a "nothing" cut-off keeps its
// meaning, and one equal to a NaN key has count 0) and index < c becomes j < c - start, clamped to [0, len].
template <typename T, bool kLargest>
void keep_between_cutoffs(const std::array<int64_t, 4>& cut, const T* __restrict__ d, int64_t start, int64_t len,
                          uint8_t* __restrict__ keep) {
  auto key32 = [](int64_t t) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(t, -1), INT32_MAX)); };
  auto rel32 = [&](int64_t c) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(c - start, 0), len)); };
  const int32_t lo_t = key32(cut[0]), lo_c = rel32(cut[1]), hi_t = key32(cut[2]), hi_c = rel32(cut[3]);
  for (int32_t j = 0; j < static_cast<int32_t>(len); ++j) {
    const int32_t key = static_cast<int32_t>(key_of<T>(d[j]));
    const bool in_hi = (kLargest ? key > hi_t : key < hi_t) | ((key == hi_t) & (j < hi_c));
    const bool in_lo = (kLargest ? key > lo_t : key < lo_t) | ((key == lo_t) & (j < lo_c));
    keep[j] = in_hi & !in_lo;
  }
}


// The four uniforms of each of the 4-element groups first .. first + groups - 1 of one stream
// (uniform4 in task_vectors.h), kWidth groups at a time: Philox's rounds on lanes, then the words
// interleaved into element order. A batch whose low counter word would wrap takes the scalar path.
void uniforms(int64_t first, int64_t groups, uint32_t stream, uint32_t k0, uint32_t k1, float* u) {
  using namespace simd;
  int64_t q = 0;
  alignas(32) float words[4][kWidth];
  for (; q + kWidth <= groups && static_cast<uint32_t>(first + q) <= UINT32_MAX - kWidth; q += kWidth) {
    const uint64_t g = static_cast<uint64_t>(first + q);
    I c[4] = {add(iset(static_cast<int32_t>(g)), iota()), iset(static_cast<int32_t>(g >> 32)),
              iset(static_cast<int32_t>(stream)), iset(0)};
    uint32_t key0 = k0, key1 = k1;
    for (int r = 0; r < 10; ++r) {  // philox4x32_10, lane-wise
      I hi0, lo0, hi1, lo1;
      mulhilo(c[0], 0xD2511F53u, hi0, lo0);
      mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
      c[0] = hi1 ^ c[1] ^ iset(static_cast<int32_t>(key0));
      c[2] = hi0 ^ c[3] ^ iset(static_cast<int32_t>(key1));
      c[1] = lo1, c[3] = lo0;
      key0 += 0x9E3779B9u, key1 += 0xBB67AE85u;
    }
    for (int w = 0; w < 4; ++w) store(words[w], mul(to_float(shr(c[w], 8)), fset(5.9604644775390625e-08f)));
    for (int l = 0; l < kWidth; ++l)
      for (int w = 0; w < 4; ++w) u[4 * (q + l) + w] = words[w][l];
  }
  for (; q < groups; ++q) uniform4(first + q, stream, k0, k1, u + 4 * q);
}

// Which elements of [start, start + len) of expert i survive its sparsification.
template <typename T>
void keep_flags(const Params& P, int i, const T* d, int64_t start, int64_t len, int64_t row_cols,
                uint8_t* keep, float* scratch_p) {
  switch (P.mode) {
    case kNone:
      std::fill(keep, keep + len, 1);
      return;
    case kMagnitude:
      return keep_between_cutoffs<T, true>(P.cuts[i], d, start, len, keep);
    case kOutliers:
      return keep_between_cutoffs<T, false>(P.cuts[i], d, start, len, keep);
    case kRandom:
    case kRank: {
      const double density = P.densities[i];
      const float p = static_cast<float>(density);  // DARE: u < density in fp32
      if (density >= 1) { std::fill(keep, keep + len, 1); return; }
      if (P.mode == kRank && density <= 0) { std::fill(keep, keep + len, 0); return; }
      if (P.mode == kRank) rank_probabilities<T>(d, row_cols, density, P.epsilons[i], scratch_p);
      // the Philox draws of every 4-element group overlapping the block first (a loop over groups the
      // compiler vectorises), then the comparisons
      const int64_t first = start >> 2, groups = ((start + len + 3) >> 2) - first;
      thread_local std::vector<float> draws;
      draws.resize(static_cast<size_t>(groups) * 4);
      float* __restrict__ u = draws.data();
      uniforms(first, groups, i, P.key0, P.key1, u);
      const float* __restrict__ uj = u + (start & 3);
      // two loops: one with a select of the operand compiles to masked loads, which on AMD cores take
      // a microcode assist per masked-off lane (two thirds of DARE's time)
      if (P.mode == kRank)
        for (int64_t j = 0; j < len; ++j) keep[j] = uj[j] < scratch_p[j];
      else
        for (int64_t j = 0; j < len; ++j) keep[j] = uj[j] < p;
      return;
    }
  }
}

// The fused pass orders magnitudes by the float bits of |d| (d is a value of T: one AND per lane, no
// conversion back to T's bits), an order that T's keys share. This maps a key t of T to that domain so
// that key > t, key < t and key == t give the same answers: below every key -> -1, above every key
// of T -> INT32_MAX, else the float bits of the value of T whose key is t.
template <typename T> int32_t float_key(int64_t t) {
  if (t < 0) return -1;
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<int32_t>(std::min<int64_t>(t, INT32_MAX));
  } else {
    if (t > 0x7FFF) return INT32_MAX;
    return static_cast<int32_t>(key_of_float(to_f(T(static_cast<uint16_t>(t), T::from_bits()))));
  }
}

// The buffers of one thread's fused merge: each expert's weighted kept deltas and the base as float,
// for kSpan elements at a time.
struct MergeScratch {
  static constexpr int64_t kSpan = 1024;  // elements: K + 1 float rows of it stay in L1/L2
  std::vector<float> wd, base;            // the base as float: converted once, read K + 1 times
  explicit MergeScratch(int K) : wd(static_cast<size_t>(K) * kSpan), base(kSpan) {}
};

// One work item of the fused merge, elements [start, start + len), kWidth lanes at a time, in two
// loops per kSpan elements. The first runs expert by expert: delta, keep rule, rescale and weight,
// stored in wd. The second sums the K values of wd (in expert order) and forms the sign election,
// the disjoint mean, lambda and the base. Every lane operation is the scalar step
// of the reference in the same order (see the file comment). Two short loops rather than one step
// over all experts: each iteration's chain of dependent operations (roundings, a division) is short
// and the iterations are independent, so the core overlaps many of them; one long step per element
// group left it waiting on the chain. keeps, for the random and rank modes, holds each expert's keep
// flags for the item ([K][len]); the magnitude and outliers modes test the cut-offs inline. Returns
// whether a delta of the item is NaN or Inf (as any NaN or Inf input makes one).
template <typename T>
bool merge_block(const Params& P, const T* base, const std::vector<const T*>& experts, T* out, int64_t start,
                 int64_t len, const uint8_t* keeps, MergeScratch& scratch) {
  using namespace simd;
  using L = Lanes<T>;
  const int K = static_cast<int>(experts.size());
  const bool by_cutoffs = P.mode == kMagnitude || P.mode == kOutliers, largest = P.mode == kMagnitude;
  // each expert's constants as lanes. keep_by_cutoffs in 32-bit lanes: keys as float_key, and
  // index < c becomes j < c - start, clamped to [0, len] so that a "nothing" cut-off keeps its meaning.
  // In an item that no tie index c falls inside, each cut-off is one key comparison against a
  // threshold th: largest, key > t or key >= t (= key > t - 1); ascending, key < t or key <= t
  // (= key < t + 1), with t +- 1 taken on T's keys.
  struct ExpertLanes { I lo_t, lo_c, hi_t, hi_c, lo_th, hi_th; F factor, weight; bool rescale; };
  auto rel32 = [&](int64_t c) { return static_cast<int32_t>(std::min<int64_t>(std::max<int64_t>(c - start, 0), len)); };
  bool tie_inside = false;  // some cut-off's tie index falls inside this item: compare indices
  auto threshold = [&](int64_t t, int64_t c) {
    const int32_t c32 = rel32(c);
    tie_inside |= c32 > 0 && c32 < len;
    const int64_t t_any = t == kNothingLargest ? t : largest ? t - 1 : t + 1;
    return iset(float_key<T>(c32 == 0 ? t : t_any));  // c32 == len: the equal keys count
  };
  std::vector<ExpertLanes> x(K);
  for (int i = 0; i < K; ++i) {
    const auto& c = P.cuts[i];
    x[i] = {iset(float_key<T>(c[0])), iset(rel32(c[1])), iset(float_key<T>(c[2])), iset(rel32(c[3])),
            threshold(c[0], c[1]), threshold(c[2], c[3]), fset(P.factors[i]), fset(P.weights[i]),
            !std::isnan(P.factors[i])};
  }
  const I abs_bits = iset(0x7FFFFFFF);
  float* const wd = scratch.wd.data();
  constexpr int64_t kSpan = MergeScratch::kSpan;

  // Expert i's weighted kept deltas of vectors [0, nvec) from b_at (the base as float), e_at (and
  // keep_at), j0 their offset in the item (tie indices), into wd row i; returns the largest delta key
  // of each lane. A NaN or Inf input makes every delta it enters NaN or Inf (inf - x, x - inf, NaN),
  // whose key is at least Inf's, so the deltas alone reveal one; a delta that overflowed from finite
  // inputs is cleared by the recount of the inputs after the pass. The keep rule is a template
  // constant, so that the loop holds no branch on it and keeps its constants in registers.
  enum KeepRule { kKeepAll, kKeepFlags, kKeepAboveThresholds, kKeepByCutoffs };
  auto weigh_expert = [&](auto rule, int i, const float* b_at, const T* e_at, const uint8_t* keep_at, int64_t nvec,
                          int32_t j0) ME_ALWAYS_INLINE {
    constexpr int kRule = decltype(rule)::value;
    const ExpertLanes c = x[i];
    float* const row = wd + i * kSpan;
    I worst = iset(0);  // a local: an accumulator behind a reference would go through memory every step
    for (int64_t v = 0; v < nvec; ++v) {
      const int64_t off = v * kWidth;
      const F d = L::round(sub(L::load(e_at + off), Lanes<float>::load(b_at + off)));
      const I key = f_to_bits(d) & abs_bits;
      worst = max(worst, key);
      I keep;
      if constexpr (kRule == kKeepAboveThresholds) {
        keep = largest ? andnot(gt(key, c.hi_th), gt(key, c.lo_th)) : andnot(gt(c.hi_th, key), gt(c.lo_th, key));
      } else if constexpr (kRule == kKeepByCutoffs) {
        const I index = add(L::lane_index(), iset(j0 + static_cast<int32_t>(off)));
        const I in_hi = (largest ? gt(key, c.hi_t) : gt(c.hi_t, key)) | (eq(key, c.hi_t) & gt(c.hi_c, index));
        const I in_lo = (largest ? gt(key, c.lo_t) : gt(c.lo_t, key)) | (eq(key, c.lo_t) & gt(c.lo_c, index));
        keep = andnot(in_hi, in_lo);
      } else if constexpr (kRule == kKeepFlags) {
        keep = gt(L::load_flags(keep_at + off), iset(0));
      } else {
        keep = iset(-1);
      }
      // d or +0 where the reference has d * 0 (+-0): the sign of a zero term changes no sum that
      // starts at +0 and no sign agreement below, so the outputs are the same
      F w = masked(d, keep);
      if (c.rescale) w = L::round(mul(w, c.factor));
      w = L::round(mul(w, c.weight));
      store(row + off, w);
    }
    return worst;
  };
  // The output of vectors [0, nvec) from wd, with the base (as float) at b_at, into o_at.
  auto combine = [&](auto consensus, const float* b_at, int64_t nvec, T* o_at) ME_ALWAYS_INLINE {
    for (int64_t v = 0; v < nvec; ++v) {
      const int64_t off = v * kWidth;
      F sum = fset(0.f);  // in expert order, from +0
      for (int i = 0; i < K; ++i) sum = add(sum, Lanes<float>::load(wd + i * kSpan + off));
      F mixed;
      if constexpr (decltype(consensus)::value) {
        // elected sign: +1 where the sum rounded to T is >= 0, else -1. The sum needs no rounding for
        // this test: its terms are values of T, so every partial sum is a multiple of T's smallest
        // subnormal u (sums below 2^24 u are exact in float, larger ones stay on the float grid, which
        // is coarser than u there), and rounding to T keeps the sign of any x with |x| >= u. It is
        // never -0 (it starts at +0). A delta agrees where wd * sign > 0.
        const F sign = select(ge(sum, fset(0.f)), fset(1.f), fset(-1.f));
        F agree_sum = fset(0.f), agree_w = fset(0.f);
        for (int i = 0; i < K; ++i) {
          const F w = Lanes<float>::load(wd + i * kSpan + off);
          const I agree = gt(mul(w, sign), fset(0.f));
          agree_sum = add(agree_sum, masked(w, agree));  // +0 for the reference's wd * 0: as above
          agree_w = add(agree_w, masked(x[i].weight, agree));
        }
        mixed = L::round(agree_sum);
        if (P.normalize) {
          const F divisor = L::round(agree_w);  // a zero divisor becomes 1
          mixed = L::round(div(mixed, select(eq(divisor, fset(0.f)), fset(1.f), divisor)));
        }
      } else {
        mixed = L::round(sum);
        if (P.normalize) mixed = L::round(div(mixed, fset(P.divisor)));
      }
      if (P.lambda != 1.f) mixed = L::round(mul(mixed, fset(P.lambda)));
      L::round_store(o_at + off, add(Lanes<float>::load(b_at + off), mixed));
    }
  };

  std::vector<const T*> e_at(K);
  std::vector<const uint8_t*> keep_at(K, keeps);
  for (int i = 0; i < K; ++i) {
    e_at[i] = experts[i] + start;
    if (keeps) keep_at[i] = keeps + i * len;
  }
  // vectors [v0, v0 + nvec) of pointers b, e, k, o (offset j0 + v0 * kWidth in the item), kSpan at a time
  auto merge_vectors = [&](auto rule, auto consensus, const T* b, const T* const* e, const uint8_t* const* k,
                           T* o, int64_t nvec, int32_t j0) {
    I worst = iset(0);
    for (int64_t v0 = 0; v0 < nvec; v0 += kSpan / kWidth) {
      const int64_t n = std::min(kSpan / kWidth, nvec - v0), off = v0 * kWidth;
      const int32_t j = j0 + static_cast<int32_t>(off);
      const float* bf = scratch.base.data();  // the base as float
      if constexpr (std::is_same_v<T, float>) {
        bf = b + off;
      } else {
        for (int64_t v = 0; v < n; ++v) Lanes<float>::store(scratch.base.data() + v * kWidth, L::load(b + off + v * kWidth));
      }
      for (int i = 0; i < K; ++i)
        worst = max(worst, weigh_expert(rule, i, bf, e[i] + off, k[i] ? k[i] + off : nullptr, n, j));
      combine(consensus, bf, n, o + off);
    }
    return worst;
  };
  const int64_t whole = len / kWidth;
  const I finite_key_limit = iset(kInfKey32 - 1);  // float bits of |d| above this: NaN or Inf
  auto run = [&](auto rule, auto consensus) {
    I worst = merge_vectors(rule, consensus, base + start, e_at.data(), keep_at.data(), out + start, whole, 0);
    const int64_t done = whole * kWidth;
    if (done == len) return lanes_set(gt(worst, finite_key_limit)) != 0;
    // the last < kWidth elements, through zero-padded copies
    std::vector<T> pad(static_cast<size_t>(K + 2) * kWidth, T(0.f));
    std::vector<uint8_t> kpad(static_cast<size_t>(K) * kWidth, 0);
    std::vector<const T*> ep(K);
    std::vector<const uint8_t*> kp(K);
    std::copy(base + start + done, base + start + len, pad.data());
    for (int i = 0; i < K; ++i) {
      std::copy(e_at[i] + done, e_at[i] + len, pad.data() + kWidth * (i + 1));
      ep[i] = pad.data() + kWidth * (i + 1);
      if (keeps) std::copy(keep_at[i] + done, keep_at[i] + len, kpad.data() + kWidth * i);
      kp[i] = kpad.data() + kWidth * i;
    }
    T* o_at = pad.data() + kWidth * (K + 1);
    worst = max(worst, merge_vectors(rule, consensus, pad.data(), ep.data(), kp.data(), o_at, 1,
                                     static_cast<int32_t>(done)));
    std::copy(o_at, o_at + (len - done), out + start + done);
    return lanes_set(gt(worst, finite_key_limit)) != 0;
  };
  auto with_rule = [&](auto consensus) {
    if (by_cutoffs && tie_inside) return run(std::integral_constant<int, kKeepByCutoffs>{}, consensus);
    if (by_cutoffs) return run(std::integral_constant<int, kKeepAboveThresholds>{}, consensus);
    if (keeps) return run(std::integral_constant<int, kKeepFlags>{}, consensus);
    return run(std::integral_constant<int, kKeepAll>{}, consensus);
  };
  return P.consensus ? with_rule(std::true_type{}) : with_rule(std::false_type{});
}

// flags[0, len) (each 0 or 1) as bits, 8 per byte, flag b of a byte's eight in bit 7 - b (what one
// multiplication gathers: byte b of x lands in bit 63 - b of x * 0x8040201008040201); and back,
// through a table of each byte's eight flags
void pack_bits(const uint8_t* flags, int64_t len, uint8_t* bits) {
  auto gather = [](uint64_t x) { return static_cast<uint8_t>((x * 0x8040201008040201ull) >> 56); };
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {  // a fixed-size copy: one load, where a variable one copies bytes
    uint64_t x;
    std::memcpy(&x, flags + j, 8);
    bits[j / 8] = gather(x);
  }
  if (j < len) {
    uint64_t x = 0;
    std::memcpy(&x, flags + j, static_cast<size_t>(len - j));
    bits[j / 8] = gather(x);
  }
}
void unpack_bits(const uint8_t* bits, int64_t len, uint8_t* flags) {
  static const auto table = [] {
    std::array<uint64_t, 256> t{};
    for (int v = 0; v < 256; ++v)
      for (int b = 0; b < 8; ++b) t[v] |= static_cast<uint64_t>((v >> (7 - b)) & 1) << (8 * b);
    return t;
  }();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) std::memcpy(flags + j, &table[bits[j / 8]], 8);
  if (j < len) std::memcpy(flags + j, &table[bits[j / 8]], static_cast<size_t>(len - j));
}

// The work items of both passes: elements [item * span, + span), a whole row in rank mode (DELLA
// ranks within rows; a 1-D tensor is one row), else kBlock elements.
struct WorkItems {
  int64_t span, count;
};
WorkItems work_items(int mode, int64_t n, int64_t rows, int64_t cols) {
  return mode == kRank ? WorkItems{cols, rows} : WorkItems{kBlock, (n + kBlock - 1) / kBlock};
}

// The random and rank modes draw keep flags per item before the merge (the others test cut-offs).
bool draws_keep_flags(int mode) { return mode == kRandom || mode == kRank; }
int64_t bytes_per_item(int64_t span) { return (span + 7) / 8; }  // one item's flags as bits

// Sums of |delta| over elements, all of them and the kept ones, in double lanes (a delta, a value of
// T, is exact in double): no loop-carried chain of scalar adds and no branch on a random flag. The
// sums' order already differs from the reference's (see the file comment).
struct L1Sums {
  simd::D all = simd::dzero(), kept_lanes = simd::dzero();
  double tail_all = 0, tail_kept = 0;

  template <typename T> void add(const T* e, const T* b, const uint8_t* keep, int64_t len) {
    using namespace simd;
    using L = Lanes<T>;
    int64_t j = 0;
    for (; j + kWidth <= len; j += kWidth) {
      const F magnitude = bits_to_f(f_to_bits(L::round(sub(L::load(e + j), L::load(b + j)))) & iset(0x7FFFFFFF));
      all = simd::add(all, magnitude);
      kept_lanes = simd::add(kept_lanes, masked(magnitude, gt(L::load_flags(keep + j), iset(0))));
    }
    for (; j < len; ++j) {
      const double v = std::fabs(static_cast<double>(to_f(delta_of<T>(e[j], b[j]))));
      tail_all += v, tail_kept += keep[j] ? v : 0.0;
    }
  }
  double total() const { return simd::sum(all) + tail_all; }
  double kept() const { return simd::sum(kept_lanes) + tail_kept; }
};

// mergekit's L1 rescale factor per expert: |delta|_1 / |kept|_1 in T, none when either is < 1e-7.
// The keep flags this pass draws (DARE's Philox numbers, DELLA's row ranks too) are kept as bits,
// kept_bits[i][item * bytes_per_item(span)..], for the merge pass to unpack instead of drawing again.

template <typename T>
std::vector<float> rescale_factors(const Params& P, const T* base, const std::vector<const T*>& experts,
                                   int64_t n, WorkItems items, int64_t cols,
                                   std::vector<std::vector<uint8_t>>& kept_bits) {
  const int K = static_cast<int>(experts.size());
  std::vector<float> factors(K, NAN);
  if (!P.rescale || P.mode == kNone) return factors;
  const bool keep_bits = draws_keep_flags(P.mode);
  if (keep_bits) kept_bits.assign(K, std::vector<uint8_t>(items.count * bytes_per_item(items.span)));
  const int64_t span = items.span;
  for (int i = 0; i < K; ++i) {
    int threads = at::get_num_threads();
    std::vector<double> before(threads, 0.0), after(threads, 0.0);
    at::parallel_for(0, items.count, 1, [&](int64_t lo, int64_t hi) {
      const bool by_delta = P.mode != kRandom;  // the keep rule reads the deltas (DARE's draws do not)
      std::vector<T> d(by_delta ? span : 0);
      std::vector<uint8_t> keep(span);
      std::vector<float> p(span);
      L1Sums sums;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t start = item * span, len = std::min(span, n - start);
        if (by_delta)
          for (int64_t j = 0; j < len; ++j) d[j] = delta_of<T>(experts[i][start + j], base[start + j]);
        keep_flags<T>(P, i, d.data(), start, len, cols, keep.data(), p.data());
        if (keep_bits) pack_bits(keep.data(), len, kept_bits[i].data() + item * bytes_per_item(span));
        sums.add(experts[i] + start, base + start, keep.data(), len);
      }
      before[at::get_thread_num()] += sums.total(), after[at::get_thread_num()] += sums.kept();
    });
    const float bt = rnd<T>(static_cast<float>(std::accumulate(before.begin(), before.end(), 0.0)));
    const float at_ = rnd<T>(static_cast<float>(std::accumulate(after.begin(), after.end(), 0.0)));
    if (bt >= 1e-7f && at_ >= 1e-7f) factors[i] = rnd<T>(bt / at_);
  }
  return factors;
}

template <typename T>
void merge_typed(Params& P, const torch::Tensor& base, const std::vector<torch::Tensor>& experts, torch::Tensor& out) {
  const int64_t n = base.numel();
  const T* b = base.data_ptr<T>();
  std::vector<const T*> e;
  for (auto& x : experts) e.push_back(x.data_ptr<T>());
  const int64_t rows = base.dim() < 2 ? 1 : base.size(0);
  const int64_t cols = rows ? n / std::max<int64_t>(rows, 1) : 0;
  const WorkItems items = work_items(P.mode, n, rows, cols);
  const int64_t span = items.span;
  std::vector<std::vector<uint8_t>> kept_bits;  // with rescale: the keep flags the first pass drew
  P.factors = rescale_factors<T>(P, b, e, n, items, cols, kept_bits);
  float weight_sum = 0.f;
  for (float w : P.weights) weight_sum += w;
  P.divisor = rnd<T>(weight_sum);
  if (std::fabs(P.divisor) < 1e-8f) P.divisor = 1.f;
  T* o = out.data_ptr<T>();
  const int K = static_cast<int>(experts.size());
  const bool drawn = draws_keep_flags(P.mode);
  std::atomic<bool> non_finite{false};
  at::parallel_for(0, items.count, 1, [&](int64_t lo, int64_t hi) {
    MergeScratch scratch(K);
    std::vector<uint8_t> keeps(drawn ? static_cast<size_t>(K) * span : 0);
    std::vector<T> d(P.mode == kRank ? span : 0);
    std::vector<float> p(P.mode == kRank ? span : 0);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t start = item * span, len = std::min(span, n - start);
      for (int i = 0; drawn && i < K; ++i) {
        uint8_t* keep = keeps.data() + i * len;
        if (!kept_bits.empty()) {
          unpack_bits(kept_bits[i].data() + item * bytes_per_item(span), len, keep);
          continue;
        }
        if (P.mode == kRank)
          for (int64_t j = 0; j < len; ++j) d[j] = delta_of<T>(e[i][start + j], b[start + j]);
        keep_flags<T>(P, i, d.data(), start, len, cols, keep, p.data());
      }
      if (merge_block<T>(P, b, e, o, start, len, drawn ? keeps.data() : nullptr, scratch)) non_finite = true;
    }
  });
  if (non_finite) {  // name the first input at fault (none: a delta overflowed from finite inputs)
    check_finite<T>(b, n, "the base");
    for (int i = 0; i < K; ++i) check_finite<T>(e[i], n, ("expert " + std::to_string(i)).c_str());
  }
}

void check_inputs(const torch::Tensor& base, const std::vector<torch::Tensor>& experts) {
  TORCH_CHECK(base.device().is_cpu(), "merge_engine CPU kernel: base must be a CPU tensor");
  TORCH_CHECK(base.is_contiguous(), "merge_engine CPU kernel: base must be contiguous");
  auto dt = base.scalar_type();
  for (const auto& x : experts) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "merge_engine CPU kernel: experts must be contiguous CPU tensors");
    TORCH_CHECK(x.scalar_type() == dt, "merge_engine CPU kernel: experts must have the base's dtype");
    TORCH_CHECK(x.sizes() == base.sizes(), "merge_engine CPU kernel: experts must have the base's shape");
  }
}

}  // namespace

torch::Tensor delta_cutoffs_cpu(const torch::Tensor& base, const torch::Tensor& expert,
                                const std::vector<int64_t>& counts, bool largest) {
  check_inputs(base, {expert});
  auto result = torch::empty({static_cast<int64_t>(counts.size()), 2}, torch::kInt64);
  auto r = result.accessor<int64_t, 2>();
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    // no delta is NaN then (an Inf expert value is an Inf magnitude, as ops/select.py orders it)
    check_finite<scalar_t>(base.data_ptr<scalar_t>(), base.numel(), "the base");
    check_finite<scalar_t>(expert.data_ptr<scalar_t>(), base.numel(), "the expert", /*allow_inf=*/true);
    const scalar_t* e = expert.data_ptr<scalar_t>();
    auto cuts = delta_cutoffs<scalar_t>(base.data_ptr<scalar_t>(), {e}, base.numel(), {counts}, largest)[0];
    for (size_t j = 0; j < counts.size(); ++j) r[j][0] = cuts[j][0], r[j][1] = cuts[j][1];
  });
  return result;
}

torch::Tensor philox_uniforms_cpu(int64_t start, int64_t numel, int64_t stream, int64_t key0, int64_t key1) {
  TORCH_CHECK(start >= 0 && numel >= 0, "merge_engine: philox_uniforms needs start >= 0 and numel >= 0");
  const int64_t first = start >> 2, groups = ((start + numel + 3) >> 2) - first;
  std::vector<float> u(static_cast<size_t>(groups) * 4);
  uniforms(first, groups, static_cast<uint32_t>(stream), static_cast<uint32_t>(key0), static_cast<uint32_t>(key1),
           u.data());
  auto out = torch::empty({numel}, torch::kFloat32);
  std::copy(u.begin() + (start & 3), u.begin() + (start & 3) + numel, out.data_ptr<float>());
  return out;
}

torch::Tensor merge_task_vectors_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& experts,
                                     const std::vector<double>& weights, int64_t mode,
                                     const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                     const std::vector<double>& densities, const std::vector<double>& epsilons,
                                     bool consensus, bool normalize, bool rescale, double lambda,
                                     int64_t key0, int64_t key1, const std::optional<torch::Tensor>& out_buffer) {
  check_inputs(base, experts);
  const size_t K = experts.size();
  TORCH_CHECK(weights.size() == K && densities.size() == K, "merge_engine: one weight and density per expert");
  TORCH_CHECK(mode >= kNone && mode <= kRank, "merge_engine: unknown sparsification mode ", mode);
  TORCH_CHECK((mode != kMagnitude && mode != kOutliers) || (counts_lo.size() == K && counts_hi.size() == K),
              "merge_engine: one (lo, hi) selection count per expert");
  TORCH_CHECK(mode != kRank || epsilons.size() == K, "merge_engine: one epsilon per expert");
  Params P{static_cast<int>(mode), consensus, normalize, rescale, static_cast<float>(lambda),
           static_cast<uint32_t>(key0), static_cast<uint32_t>(key1)};
  std::vector<torch::Tensor> inputs(experts);
  inputs.push_back(base);
  auto out = output_for(out_buffer, base, inputs);
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const bool by_cutoffs = mode == kMagnitude || mode == kOutliers;
    std::vector<const scalar_t*> e;
    std::vector<std::vector<int64_t>> counts(K);
    for (size_t i = 0; i < K; ++i) {
      P.weights.push_back(to_f(round_to<scalar_t>(static_cast<float>(weights[i]))));
      P.densities.push_back(densities[i]);
      P.epsilons.push_back(epsilons.empty() ? 0.0 : epsilons[i]);
      e.push_back(experts[i].data_ptr<scalar_t>());
      if (by_cutoffs) counts[i] = {counts_lo[i], counts_hi[i]};
    }
    auto cuts = delta_cutoffs<scalar_t>(base.data_ptr<scalar_t>(), e, base.numel(), counts, mode == kMagnitude);
    for (size_t i = 0; i < K; ++i)
      P.cuts.push_back(by_cutoffs ? std::array<int64_t, 4>{cuts[i][0][0], cuts[i][0][1], cuts[i][1][0], cuts[i][1][1]}
                                  : std::array<int64_t, 4>{kNothingLargest, 0, kNothingLargest, 0});
    merge_typed<scalar_t>(P, base, experts, out);
  });
  return out;
}

}  // namespace merge_engine
