// Bracketed select, the fast path for every cut-off of every expert: a sample of each expert's keys
// brackets its cut-off rank between two keys lo <= hi; one vectorised pass (a chunk of all experts at
// a time, so the base chunk is read from memory once) then counts, per chunk, the keys below lo, equal
// to lo and equal to hi, and lists the few keys strictly between them (in index order). The cut-off
// key T follows from these alone, and its tie index c from a rescan of the one chunk where it falls.
// When the sample misled (the rank is outside the bracket, or the list outgrew its budget) the radix
// select (radix_select.cpp) finds that cut-off instead. Both give the reference's (T, c): the bracket
// only decides how fast.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bracketed_select.h"
#include "magnitude_keys.h"
#include "radix_select.h"
#include "simd.h"

namespace merge_engine::task_vectors {

namespace {

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

}  // namespace

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
      // count 0 first: for n = 0 it is also n, and selecting nothing is the reference's answer
      if (count == 0) q.cutoff = {largest ? kNothingLargest : kNothingSmallest, 0}, q.found = true;
      else if (count == n) q.cutoff = {largest ? kNothingSmallest : kNothingLargest, 0}, q.found = true;
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

#define INSTANTIATE(T)                                                                     \
  template std::vector<std::vector<std::array<int64_t, 2>>> delta_cutoffs<T>(const T*, const std::vector<const T*>&, \
      int64_t, const std::vector<std::vector<int64_t>>&, bool);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
