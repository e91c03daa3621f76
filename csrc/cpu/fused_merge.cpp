// The fused merge of K task vectors (TIES, DARE, breadcrumbs, DELLA, task arithmetic): one pass over
// the inputs, a work item of kBlock elements (a row in rank mode) at a time, 16 lanes at a time
// (simd.h): each expert's kept, rescaled and weighted delta, the sign election and disjoint mean,
// lambda and the base. The cut-offs come from the selects beforehand, the random and rank modes'
// keep flags from sparsify.cpp (or from the rescale pass, as bits).
//
// Every arithmetic step rounds to the compute dtype T exactly where the PyTorch reference
// (merge_engine/ops/consensus.py: merge_task_vectors) rounds, and sums over experts run in float
// in expert order as torch's dim-0 reductions do; so outputs are bit-identical to the reference
// except for the random and rank modes' L1 rescale factors, whose whole-tensor sums are taken in a
// different order (the cut-off modes' take torch's sums: rescale.cpp).
// Built with -ffp-contract=off: a fused multiply-add would round differently from torch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "bit_packing.h"
#include "fused_merge.h"
#include "magnitude_keys.h"
#include "parallel.h"
#include "rescale.h"
#include "simd.h"
#include "sparsify.h"

namespace merge_engine::task_vectors {

namespace {

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
            P.factors[i] != 1.f};
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

// ValueError naming the first input that holds NaN or Inf.
template <typename T> void check_inputs_finite(const T* base, const std::vector<const T*>& experts, int64_t n) {
  check_finite<T>(base, n, "the base");
  for (size_t i = 0; i < experts.size(); ++i) check_finite<T>(experts[i], n, ("expert " + std::to_string(i)).c_str());
}

}  // namespace

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
  const bool by_cutoffs = P.mode == kMagnitude || P.mode == kOutliers;
  P.factors = P.rescale && by_cutoffs ? cutoff_rescale_factors<T>(P, base, experts, items, cols)
                                      : rescale_factors<T>(P, b, e, n, items, cols, kept_bits);
  if (std::any_of(P.factors.begin(), P.factors.end(), [](float f) { return std::isnan(f); })) {
    // the reference's NaN factor makes all of that expert's deltas NaN, and every merged value with them
    check_inputs_finite<T>(b, e, n);
    out.fill_(NAN);
    return;
  }
  float weight_sum = 0.f;
  for (float w : P.weights) weight_sum += w;
  P.divisor = rnd<T>(weight_sum);
  // |sum| < 1e-8 compared in T, as torch compares the reference's: fp16's 1e-8 is 0, so a zero sum stays
  if (std::fabs(P.divisor) < rnd<T>(1e-8f)) P.divisor = 1.f;
  T* o = out.data_ptr<T>();
  const int K = static_cast<int>(experts.size());
  const bool drawn = draws_keep_flags(P.mode);
  std::atomic<bool> non_finite{false};
  parallel_chunks(items.count, kItemsPerChunk, [&](int64_t lo, int64_t hi, int64_t) {
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
  if (non_finite) check_inputs_finite<T>(b, e, n);  // none at fault: a delta overflowed from finite inputs
}

#define INSTANTIATE(T) \
  template void merge_typed<T>(Params&, const torch::Tensor&, const std::vector<torch::Tensor>&, torch::Tensor&);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
