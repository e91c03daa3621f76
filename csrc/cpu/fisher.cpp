// CPU kernels of the Fisher family (merge_engine/ops/fisher.py): the in-place accumulation
// F += scale * g^2, and the Fisher-weighted average of K tensors in one pass over their bytes.
//
// Each step is the reference's fp32 operation, in the reference's order, and the build uses
// -ffp-contract=off (a fused multiply-add would round differently), so results are bit-identical
// to the PyTorch references. Bad Fisher values (negative, NaN, Inf) are counted during the merge
// pass itself and reported after it, which costs no extra read of the Fishers.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cfloat>
#include <numeric>
#include <vector>

#include "../fisher.h"
#include "dtypes.h"
#include "memory.h"

namespace merge_engine {
namespace {

constexpr int64_t kBlock = 4096;  // elements per work item: num/den (32 KB) stay in cache across the K models

template <typename F, typename G> void accumulate_typed(F* fisher, const G* grad, int64_t n, float scale) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float g = to_f(grad[i]);
      fisher[i] = round_to<F>(to_f(fisher[i]) + (g * g) * scale);
    }
  });
}

// One model's contribution to a block: d = max(F, floor) * c; num (+)= d * theta; den (+)= d.
// Returns how many Fisher values in the block are negative, NaN or Inf.
template <typename P, typename F, bool kFirst>
int64_t add_model(const P* p, const F* f, int64_t len, float c, float floor, float* num, float* den) {
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float fv = to_f(f[i]);
    bad += static_cast<int>(!(fv >= 0.f)) | static_cast<int>(fv > FLT_MAX);  // bitwise: no branch
    const float d = (fv < floor ? floor : fv) * c;
    const float term = d * to_f(p[i]);
    if (kFirst) {
      num[i] = term;
      den[i] = d;
    } else {
      num[i] += term;
      den[i] += d;
    }
  }
  return bad;
}

// out = num / den where den > 0, else theta_0 (which goes through float and back unchanged: selecting
// in float keeps the loop branch-free).
template <typename P> void write_means(const float* num, const float* den, const P* first, P* out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float mean = num[i] / den[i], theta0 = to_f(first[i]);
    out[i] = round_to<P>(den[i] > 0.f ? mean : theta0);
  }
}

template <typename P, typename F>
void merge_typed(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& fishers,
                 const std::vector<float>& coefficients, const std::vector<float>& floors, torch::Tensor& out) {
  const int64_t n = out.numel(), K = static_cast<int64_t>(params.size());
  std::vector<const P*> p(K);
  std::vector<const F*> f(K);
  for (int64_t j = 0; j < K; ++j) {
    p[j] = params[j].data_ptr<P>();
    f[j] = fishers[j].data_ptr<F>();
  }
  P* o = out.data_ptr<P>();
  std::vector<std::vector<int64_t>> bad(at::get_num_threads(), std::vector<int64_t>(K, 0));
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    auto& my_bad = bad[at::get_thread_num()];
    float num[kBlock], den[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, len = std::min(kBlock, n - lo);
      my_bad[0] += add_model<P, F, true>(p[0] + lo, f[0] + lo, len, coefficients[0], floors[0], num, den);
      for (int64_t j = 1; j < K; ++j)
        my_bad[j] += add_model<P, F, false>(p[j] + lo, f[j] + lo, len, coefficients[j], floors[j], num, den);
      write_means<P>(num, den, p[0] + lo, o + lo, len);
    }
  });
  for (int64_t j = 0; j < K; ++j) {
    int64_t total = 0;
    for (const auto& t : bad) total += t[j];
    TORCH_CHECK_VALUE(total == 0, "the Fisher of model ", j, " has ", total,
                      " negative, NaN or Inf value(s); a Fisher is a mean of squares");
  }
}

std::vector<float> as_floats(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

}  // namespace

void accumulate_fisher_cpu(torch::Tensor& fisher, const torch::Tensor& grad, double scale) {
  check_accumulate_fisher_args(fisher, grad, c10::DeviceType::CPU);
  dispatch_dtype(fisher.scalar_type(), [&](auto f_tag) {
    using F = decltype(f_tag);
    dispatch_dtype(grad.scalar_type(), [&](auto g_tag) {
      using G = decltype(g_tag);
      accumulate_typed<F, G>(fisher.data_ptr<F>(), grad.data_ptr<G>(), fisher.numel(), static_cast<float>(scale));
    });
  });
}

torch::Tensor fisher_merge_cpu(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& fishers,
                               const std::vector<double>& coefficients, const std::vector<double>& floors,
                               const std::optional<torch::Tensor>& out_buffer) {
  check_fisher_merge_args(params, fishers, coefficients, floors, c10::DeviceType::CPU);
  std::vector<torch::Tensor> inputs(params);
  inputs.insert(inputs.end(), fishers.begin(), fishers.end());
  auto out = output_for(out_buffer, params[0], inputs);
  const auto c = as_floats(coefficients), fl = as_floats(floors);
  dispatch_dtype(params[0].scalar_type(), [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch_dtype(fishers[0].scalar_type(), [&](auto f_tag) {
      using F = decltype(f_tag);
      merge_typed<P, F>(params, fishers, c, fl, out);
    });
  });
  return out;
}

}  // namespace merge_engine
