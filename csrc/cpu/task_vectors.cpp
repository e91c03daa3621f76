// CPU kernels of the task-vector family: exact magnitude cut-offs by radix select, and the fused
// merge of K task vectors (TIES, DARE, breadcrumbs, DELLA, task arithmetic) in one pass.
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
#include <cmath>
#include <numeric>
#include <vector>

#include "../task_vectors.h"
#include "dtypes.h"

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

// ---------------------------------------------------------------------------------------------
// Radix select: the cut-off (T, c) of the first `count` elements of the stable order of the keys
// of |expert - base| (ops/select.py). Keys have 15 (16-bit types) or 31 (fp32) significant bits:
// one histogram pass per 16 bits, then, only if the cut-off key is shared by more elements than
// the selection needs, one parallel pass counting equal keys per chunk and a scan of one chunk.
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
std::array<int64_t, 2> delta_cutoff(const T* e, const T* b, int64_t n, int64_t count, bool largest) {
  count = std::min(std::max<int64_t>(count, 0), n);
  if (count == 0) return {largest ? kNothingLargest : kNothingSmallest, 0};
  if (count == n) return {largest ? kNothingSmallest : kNothingLargest, 0};  // every key is beyond it
  auto key = [&](int64_t i) { return key_of<T>(delta_of<T>(e[i], b[i])); };
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

template <typename T> void check_finite(const T* x, int64_t n, const char* what) {
  std::vector<int64_t> bad(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    int64_t c = 0;
    for (int64_t i = lo; i < hi; ++i) c += key_of<T>(x[i]) >= inf_key<T>();
    bad[at::get_thread_num()] += c;
  });
  int64_t total = std::accumulate(bad.begin(), bad.end(), int64_t{0});
  TORCH_CHECK_VALUE(total == 0, what, " has ", total,
                    " NaN or Inf value(s); a magnitude ordering is undefined");
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
};

// DELLA keep probabilities of one row of |delta| (ops/sparsify.py: della_keep_probability).
template <typename T>
void rank_probabilities(const T* d, int64_t cols, double density, double epsilon, float* p, int64_t* order) {
  std::iota(order, order + cols, int64_t{0});
  std::stable_sort(order, order + cols, [&](int64_t a, int64_t b) { return key_of<T>(d[a]) < key_of<T>(d[b]); });
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

// Elements of x[0, len) that are NaN or Inf, by their magnitude keys in 32-bit lanes.
template <typename T> int64_t count_non_finite(const T* __restrict__ x, int64_t len) {
  const int32_t inf = static_cast<int32_t>(inf_key<T>());
  int32_t c = 0;
  for (int64_t j = 0; j < len; ++j) c += static_cast<int32_t>(key_of<T>(x[j])) >= inf;
  return c;
}

// Which elements of [start, start + len) of expert i survive its sparsification.
template <typename T>
void keep_flags(const Params& P, int i, const T* d, int64_t start, int64_t len, int64_t row_cols,
                uint8_t* keep, float* scratch_p, int64_t* scratch_order) {
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
      if (P.mode == kRank) rank_probabilities<T>(d, row_cols, density, P.epsilons[i], scratch_p, scratch_order);
      // the Philox draws of every 4-element group overlapping the block first (a loop over groups the
      // compiler vectorises), then the comparisons
      const int64_t first = start >> 2, groups = ((start + len + 3) >> 2) - first;
      thread_local std::vector<float> draws;
      draws.resize(static_cast<size_t>(groups) * 4);
      float* __restrict__ u = draws.data();
      for (int64_t q = 0; q < groups; ++q) uniform4(first + q, i, P.key0, P.key1, u + 4 * q);
      const float* __restrict__ uj = u + (start & 3);
      for (int64_t j = 0; j < len; ++j) keep[j] = uj[j] < (P.mode == kRank ? scratch_p[j] : p);
      return;
    }
  }
}

// One work item: elements [start, start + len) (a whole row in rank mode).
template <typename T>
void merge_block(const Params& P, const T* base, const std::vector<const T*>& experts, T* out,
                 int64_t start, int64_t len, int64_t row_cols, std::vector<float>& w_scratch,
                 std::vector<T>& d_scratch, std::vector<uint8_t>& keep, std::vector<float>& p_scratch,
                 std::vector<int64_t>& order_scratch, std::vector<float>& acc, int64_t* non_finite) {
  const int K = static_cast<int>(experts.size());
  // NaN/Inf are counted here, in the pass that reads every input anyway (base first, then experts)
  non_finite[0] += count_non_finite<T>(base + start, len);
  for (int i = 0; i < K; ++i) non_finite[i + 1] += count_non_finite<T>(experts[i] + start, len);
  // weighted (sparsified, rescaled, weighted) deltas, in T, laid out [K][len], and their sum over
  // experts (in expert order, from +0 as torch's sum starts) in the same loop
  float* __restrict__ sum = acc.data();
  float* __restrict__ agree_sum = sum + len;
  float* __restrict__ agree_w = agree_sum + len;
  std::fill(sum, sum + 3 * len, 0.f);
  for (int i = 0; i < K; ++i) {
    T* __restrict__ d = d_scratch.data();
    const T* __restrict__ e = experts[i] + start;
    const T* __restrict__ b = base + start;
    for (int64_t j = 0; j < len; ++j) d[j] = delta_of<T>(e[j], b[j]);
    keep_flags<T>(P, i, d, start, len, row_cols, keep.data(), p_scratch.data(), order_scratch.data());
    const float f = P.factors[i], w = P.weights[i];
    float* __restrict__ wd = w_scratch.data() + static_cast<int64_t>(i) * len;
    const uint8_t* __restrict__ kp = keep.data();
    // to_f(d) * keep is exact (x * 0 keeps the sign of zero); then the rescale (if any) and the weight,
    // each rounded to T
    if (std::isnan(f)) {
      for (int64_t j = 0; j < len; ++j) {
        wd[j] = rnd<T>((to_f(d[j]) * (kp[j] ? 1.f : 0.f)) * w);
        sum[j] += wd[j];
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        wd[j] = rnd<T>(rnd<T>((to_f(d[j]) * (kp[j] ? 1.f : 0.f)) * f) * w);
        sum[j] += wd[j];
      }
    }
  }
  float* __restrict__ mixed = sum;  // reused in place
  if (P.consensus) {
    // elected sign: +1 where the sum rounded to T is >= 0 (a zero sum elects +), else -1
    for (int64_t j = 0; j < len; ++j) sum[j] = rnd<T>(sum[j]) >= 0.f ? 1.f : -1.f;
    for (int i = 0; i < K; ++i) {
      const float* __restrict__ wd = w_scratch.data() + static_cast<int64_t>(i) * len;
      const float wi = P.weights[i];
      for (int64_t j = 0; j < len; ++j) {
        // branch-free so it vectorises: a disagreeing (or zero) delta adds v * 0 = +-0, as in torch
        const float agree = static_cast<float>(wd[j] * sum[j] > 0.f);  // exact sign test
        agree_sum[j] += wd[j] * agree;
        agree_w[j] += wi * agree;
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      float m = rnd<T>(agree_sum[j]);
      if (P.normalize) {
        const float divisor = rnd<T>(agree_w[j]);
        m = rnd<T>(m / (divisor + static_cast<float>(divisor == 0.f)));  // a zero divisor becomes 1
      }
      mixed[j] = m;
    }
  } else {
    float weight_sum = 0.f;
    for (int i = 0; i < K; ++i) weight_sum += P.weights[i];
    float divisor = rnd<T>(weight_sum);
    divisor = std::fabs(divisor) < 1e-8f ? 1.f : divisor;
    for (int64_t j = 0; j < len; ++j) {
      const float m = rnd<T>(sum[j]);
      mixed[j] = P.normalize ? rnd<T>(m / divisor) : m;
    }
  }
  if (P.lambda != 1.f)
    for (int64_t j = 0; j < len; ++j) mixed[j] = rnd<T>(mixed[j] * P.lambda);
  const T* __restrict__ b = base + start;
  T* __restrict__ o = out + start;
  for (int64_t j = 0; j < len; ++j) o[j] = round_to<T>(to_f(b[j]) + mixed[j]);
}

// mergekit's L1 rescale factor per expert: |delta|_1 / |kept|_1 in T, none when either is < 1e-7.
template <typename T>
std::vector<float> rescale_factors(const Params& P, const T* base, const std::vector<const T*>& experts,
                                   int64_t n, int64_t rows, int64_t cols) {
  const int K = static_cast<int>(experts.size());
  std::vector<float> factors(K, NAN);
  if (!P.rescale || P.mode == kNone) return factors;
  for (int i = 0; i < K; ++i) {
    int threads = at::get_num_threads();
    std::vector<double> before(threads, 0.0), after(threads, 0.0);
    const int64_t span = P.mode == kRank ? cols : kBlock;
    const int64_t items = P.mode == kRank ? rows : (n + kBlock - 1) / kBlock;
    at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> d(span);
      std::vector<uint8_t> keep(span);
      std::vector<float> p(span);
      std::vector<int64_t> order(span);
      double b = 0, a = 0;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t start = item * span, len = std::min(span, n - start);
        for (int64_t j = 0; j < len; ++j) d[j] = delta_of<T>(experts[i][start + j], base[start + j]);
        keep_flags<T>(P, i, d.data(), start, len, cols, keep.data(), p.data(), order.data());
        for (int64_t j = 0; j < len; ++j) {
          const double v = std::fabs(static_cast<double>(to_f(d[j])));
          b += v;
          if (keep[j]) a += v;
        }
      }
      before[at::get_thread_num()] += b;
      after[at::get_thread_num()] += a;
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
  // DELLA ranks within rows: a 1-D tensor is one row
  const int64_t rows = base.dim() < 2 ? 1 : base.size(0);
  const int64_t cols = rows ? n / std::max<int64_t>(rows, 1) : 0;
  P.factors = rescale_factors<T>(P, b, e, n, rows, cols);
  T* o = out.data_ptr<T>();
  const int K = static_cast<int>(experts.size());
  const int64_t span = P.mode == kRank ? cols : kBlock;
  const int64_t items = P.mode == kRank ? rows : (n + kBlock - 1) / kBlock;
  std::vector<std::vector<int64_t>> non_finite(at::get_num_threads(), std::vector<int64_t>(K + 1, 0));
  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> w(static_cast<size_t>(K) * span), acc(3 * span);
    std::vector<T> d(span);
    std::vector<uint8_t> keep(span);
    std::vector<float> p(span);
    std::vector<int64_t> order(span);
    int64_t* bad = non_finite[at::get_thread_num()].data();
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t start = item * span;
      merge_block<T>(P, b, e, o, start, std::min(span, n - start), cols, w, d, keep, p, order, acc, bad);
    }
  });
  for (int i = 0; i <= K; ++i) {
    int64_t total = 0;
    for (auto& t : non_finite) total += t[i];
    TORCH_CHECK_VALUE(total == 0, i == 0 ? std::string("the base") : "expert " + std::to_string(i - 1), " has ",
                      total, " NaN or Inf value(s); a magnitude ordering is undefined");
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
    check_finite<scalar_t>(base.data_ptr<scalar_t>(), base.numel(), "the base");
    check_finite<scalar_t>(expert.data_ptr<scalar_t>(), base.numel(), "the expert");
    for (size_t j = 0; j < counts.size(); ++j) {
      auto cut = delta_cutoff<scalar_t>(expert.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), base.numel(),
                                        counts[j], largest);
      r[j][0] = cut[0];
      r[j][1] = cut[1];
    }
  });
  return result;
}

torch::Tensor merge_task_vectors_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& experts,
                                     const std::vector<double>& weights, int64_t mode,
                                     const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                     const std::vector<double>& densities, const std::vector<double>& epsilons,
                                     bool consensus, bool normalize, bool rescale, double lambda,
                                     int64_t key0, int64_t key1) {
  check_inputs(base, experts);
  const size_t K = experts.size();
  TORCH_CHECK(weights.size() == K && densities.size() == K, "merge_engine: one weight and density per expert");
  TORCH_CHECK(mode >= kNone && mode <= kRank, "merge_engine: unknown sparsification mode ", mode);
  TORCH_CHECK((mode != kMagnitude && mode != kOutliers) || (counts_lo.size() == K && counts_hi.size() == K),
              "merge_engine: one (lo, hi) selection count per expert");
  TORCH_CHECK(mode != kRank || epsilons.size() == K, "merge_engine: one epsilon per expert");
  Params P{static_cast<int>(mode), consensus, normalize, rescale, static_cast<float>(lambda),
           static_cast<uint32_t>(key0), static_cast<uint32_t>(key1)};
  auto out = torch::empty_like(base);
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    {
      const int64_t n = base.numel();
      for (size_t i = 0; i < K; ++i) {
        P.weights.push_back(to_f(round_to<scalar_t>(static_cast<float>(weights[i]))));
        P.densities.push_back(densities[i]);
        P.epsilons.push_back(epsilons.empty() ? 0.0 : epsilons[i]);
        std::array<int64_t, 4> cut{kNothingLargest, 0, kNothingLargest, 0};
        if (mode == kMagnitude || mode == kOutliers) {
          const bool largest = mode == kMagnitude;
          auto lo = delta_cutoff<scalar_t>(experts[i].data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), n, counts_lo[i], largest);
          auto hi = delta_cutoff<scalar_t>(experts[i].data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), n, counts_hi[i], largest);
          cut = {lo[0], lo[1], hi[0], hi[1]};
        }
        P.cuts.push_back(cut);
      }
      merge_typed<scalar_t>(P, base, experts, out);
    }
  });
  return out;
}

}  // namespace merge_engine
