// DELLA's ranks within rows (ops/sparsify.py: della_keep_probability): each row's elements in the
// stable order of their magnitude keys, by counting where the keys span few values and by an LSD radix
// sort otherwise, and the keep probability of each rank.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "magnitude_keys.h"
#include "row_ranks.h"

namespace merge_engine::task_vectors {

namespace {

// The indices of d[0, cols) in the stable ascending order of their magnitude keys (ties by index),
// in a thread's scratch. An LSD radix sort, 8 bits a pass (two passes for 16-bit types, four for
// float32), every pass's digit counts taken in one read of the keys, a pass skipped where every key
// shares its digit; each pass is stable, so the whole is. It replaced std::stable_sort with a
// comparison that formed both keys, which held a 1.1B DELLA merge at 7.8x its I/O floor.
template <typename T> const int32_t* stable_key_order(const T* d, int64_t cols) {
  constexpr int kPasses = sizeof(T);
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

// The keep probability of every rank of a row, (r / denom) * scale + base in float as the reference
// computes it, from a thread's cache of the last few rows' tables (a lookup instead of a division per
// element; the experts of a merge take turns, each with its own density).
const float* probability_table(int64_t cols, float denom, float scale, float base) {
  struct Table { int64_t cols; float denom, scale, base; std::vector<float> p; };
  thread_local std::vector<Table> tables;
  for (const Table& t : tables)
    if (t.cols == cols && t.denom == denom && t.scale == scale && t.base == base) return t.p.data();
  if (tables.size() == 8) tables.erase(tables.begin());
  Table& t = tables.emplace_back(Table{cols, denom, scale, base, std::vector<float>(static_cast<size_t>(cols))});
  for (int64_t r = 0; r < cols; ++r) t.p[r] = (static_cast<float>(r) / denom) * scale + base;
  return t.p.data();
}

// Each element's rank in the stable ascending order of its row's magnitude keys, by counting: one
// counter per key value between the row's smallest and largest nonzero keys, plus one for zero (exact
// zeros are common in bf16 deltas and far below the rest). A rank is then the count of smaller keys plus
// the earlier equal ones, taken in index order, so ties go by index as in the stable sort. False (and
// nothing written) when the keys span too many values for the counters to be cheaper than the sort:
// float32 rows, or 16-bit rows spread over many binades. Three passes in index order, where the radix
// sort scatters twice and the probabilities a third time (it took 35% of a DELLA merge's CPU time).
template <typename T>
bool counting_ranks(const T* d, int64_t cols, const float* probability, float* p) {
  thread_local std::vector<uint32_t> key_buffer;
  thread_local std::vector<int32_t> next;
  key_buffer.resize(static_cast<size_t>(cols));
  uint32_t* keys = key_buffer.data();
  uint32_t below_lo = UINT32_MAX, hi = 0;  // key - 1 wraps for zero: the smallest nonzero key, branch-free
  for (int64_t j = 0; j < cols; ++j) {
    const uint32_t key = static_cast<uint32_t>(key_of<T>(d[j]));
    keys[j] = key;
    below_lo = std::min(below_lo, key - 1u), hi = std::max(hi, key);
  }
  const uint32_t lo = hi == 0 ? 1 : below_lo + 1;  // only zeros: any lo
  const uint64_t span = static_cast<uint64_t>(std::max(hi, lo) - lo) + 2;  // counter 0: key 0; k - lo + 1: key k
  if (span > static_cast<uint64_t>(8 * cols + 4096)) return false;
  next.assign(span, 0);
  // key 0 -> 0 and key k >= lo >= 1 -> k - lo + 1 <= k: the smaller of the two, with no branch
  auto counter = [lo](uint32_t key) { return std::min(key - lo + 1u, key); };
  for (int64_t j = 0; j < cols; ++j) ++next[counter(keys[j])];
  int32_t first = 0;  // each counter becomes the rank of its key's first element
  for (auto& c : next) first += std::exchange(c, first);
  for (int64_t j = 0; j < cols; ++j) p[j] = probability[next[counter(keys[j])]++];
  return true;
}

}  // namespace

// DELLA keep probabilities of one row of |delta| (ops/sparsify.py: della_keep_probability).
template <typename T> void rank_probabilities(const T* d, int64_t cols, double density, double epsilon, float* p) {
  TORCH_CHECK(cols <= INT32_MAX, "merge_engine: DELLA ranks rows of at most 2^31 - 1 elements, not ", cols);
  const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
  const float base = static_cast<float>(density - epsilon);  // as the reference: python floats, rounded once
  const float scale = static_cast<float>(2.0 * epsilon);
  const float* probability = probability_table(cols, denom, scale, base);
  if (counting_ranks(d, cols, probability, p)) return;
  const int32_t* order = stable_key_order(d, cols);
  for (int64_t r = 0; r < cols; ++r) p[order[r]] = probability[r];
}

#define INSTANTIATE(T) template void rank_probabilities<T>(const T*, int64_t, double, double, float*);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
