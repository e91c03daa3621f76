// mergekit's L1 rescale: per expert, the sum of |delta| over its sum over the kept elements, from a
// pass before the merge (which scales each kept delta by it).
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bit_packing.h"
#include "magnitude_keys.h"
#include "parallel.h"
#include "rescale.h"
#include "simd.h"
#include "sparsify.h"

namespace merge_engine::task_vectors {

namespace {

// Sums of |delta| over elements, all of them and the kept ones, in double lanes (a delta, a value of
// T, is exact in double): no loop-carried chain of scalar adds and no branch on a random flag. The
// sums' order already differs from the reference's (see fused_merge.cpp).
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

}  // namespace

// fp16's rescale is computed in fp32 where ops/sparsify.py's rescale_in_fp32 says: always for drawn masks
// (mergekit's fp32 work dtype for fp16 DARE and DELLA), and for cut-off masks where an fp16 norm overflows.
template <typename T> constexpr bool kHalf = std::is_same_v<T, c10::Half>;

// The factor from the two norms, each already rounded to T (as torch's sum of a tensor of T returns), and
// itself rounded to T; U = float: the norms and the factor in fp32. 1 (none, an exact no-op) where either
// norm is < 1e-7, as the reference's None; NaN where the reference's is (Inf / Inf: a kept delta that
// overflowed T), which makes every merged value NaN (fused_merge.cpp).
template <typename U> float factor_of(float before, float after) {
  return before < 1e-7f || after < 1e-7f ? 1.f : rnd<U>(before / after);
}

// Whether the reference rescales expert i: not where it returns the delta whole (density >= 1) or zeros
// (TIES's and DELLA's density <= 0), where an overflowed delta must not make the factor NaN.
bool rescaled(const Params& P, int i) {
  const double density = P.densities[i];
  return density < 1 && (density > 0 || P.mode == kRandom || P.mode == kOutliers);
}

// The cut-off modes' factors (TIES's and breadcrumbs' `rescale: true`), whose keep rule is no draw but
// the cut-offs, so that mergekit's factor can be matched: its two norms are torch's sums of |delta| and
// |delta| * keep in T, whose order (vectorised partial sums, split over threads) the double lanes
// below do not reproduce, and in float32 the factor then differs in its last bits, and so does every
// kept element. So the norms are taken here with the same torch sum, on |delta| materialised in T.
template <typename T>
std::vector<float> cutoff_rescale_factors(const Params& P, const torch::Tensor& base,
                                          const std::vector<torch::Tensor>& experts, WorkItems items, int64_t cols) {
  const int K = static_cast<int>(experts.size());
  std::vector<float> factors(K, 1.f);
  const int64_t n = base.numel(), span = items.span;
  for (int i = 0; i < K; ++i) {
    if (!rescaled(P, i)) continue;
    const torch::Tensor magnitude = at::sub(experts[i], base).abs_();  // |delta| in T, as the reference
    torch::Tensor keep = at::empty({n}, base.options().dtype(at::kByte));
    const T* d = magnitude.data_ptr<T>();  // a magnitude's key is its delta's
    uint8_t* k = keep.data_ptr<uint8_t>();
    parallel_chunks(items.count, kItemsPerChunk, [&](int64_t lo, int64_t hi, int64_t) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t start = item * span, len = std::min(span, n - start);
        keep_flags<T>(P, i, d + start, start, len, cols, k + start, nullptr);
      }
    });
    const float before = magnitude.sum().item<float>();
    if constexpr (kHalf<T>) {  // |delta| kept whole: a norm that overflows fp16 is taken again in fp32
      const torch::Tensor kept = magnitude * keep.view(magnitude.sizes());
      const float after = kept.sum().item<float>();
      factors[i] = std::isfinite(before) && std::isfinite(after)
                       ? factor_of<T>(before, after)
                       : factor_of<float>(magnitude.to(at::kFloat).sum().item<float>(),
                                          kept.to(at::kFloat).sum().item<float>());
    } else {
      factors[i] = factor_of<T>(before, magnitude.mul_(keep.view(magnitude.sizes())).sum().item<float>());  // |delta| * keep
    }
  }
  return factors;
}

template <typename T>
std::vector<float> rescale_factors(const Params& P, const T* base, const std::vector<const T*>& experts,
                                   int64_t n, WorkItems items, int64_t cols,
                                   std::vector<std::vector<uint8_t>>& kept_bits) {
  const int K = static_cast<int>(experts.size());
  std::vector<float> factors(K, 1.f);
  if (!P.rescale || P.mode == kNone) return factors;
  const bool keep_bits = draws_keep_flags(P.mode);
  if (keep_bits) kept_bits.assign(K, std::vector<uint8_t>(items.count * bytes_per_item(items.span)));
  const int64_t span = items.span;
  for (int i = 0; i < K; ++i) {
    // sums per chunk, added in chunk order: the same factor whatever the thread count
    std::vector<double> before(chunk_count(items.count, kItemsPerChunk)), after(before.size());
    parallel_chunks(items.count, kItemsPerChunk, [&](int64_t lo, int64_t hi, int64_t chunk) {
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
      before[chunk] = sums.total(), after[chunk] = sums.kept();
    });
    const float b = static_cast<float>(std::accumulate(before.begin(), before.end(), 0.0));
    const float a = static_cast<float>(std::accumulate(after.begin(), after.end(), 0.0));
    if (rescaled(P, i))  // (the flags above are drawn regardless: the merge pass unpacks them)
      factors[i] = kHalf<T> ? factor_of<float>(b, a) : factor_of<T>(rnd<T>(b), rnd<T>(a));  // drawn masks
  }
  return factors;
}

#define INSTANTIATE(T)                                                                                       \
  template std::vector<float> rescale_factors<T>(const Params&, const T*, const std::vector<const T*>&, int64_t, \
                                                  WorkItems, int64_t, std::vector<std::vector<uint8_t>>&);   \
  template std::vector<float> cutoff_rescale_factors<T>(const Params&, const torch::Tensor&,                  \
                                                         const std::vector<torch::Tensor>&, WorkItems, int64_t);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
