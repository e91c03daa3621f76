// CUDA entry points of the task-vector family (bound in bindings.cpp), mirroring
// csrc/cpu/task_vectors.cpp: exact magnitude cut-offs by radix select, and the fused merge of K task
// vectors (TIES, DARE, breadcrumbs, DELLA, task arithmetic) in one elementwise pass. Each checks its
// arguments (../task_vectors.h) and dispatches on the dtype to the algorithms, a file each:
//   radix_select.cu  the exact cut-offs of the magnitude and outliers modes,
//   row_ranks.cu     DELLA's ranks within rows, and the keep flags of its draws,
//   rescale.cu       mergekit's L1 rescale factors, a pass before the merge,
//   fused_merge.cu   the merge pass (fused_merge.cuh: its arguments and every mode's keep rule);
// magnitude_keys.cuh holds the keys they order elements by, launch.cuh the launch helpers.
//
// Host/device split: the radix select reads small histograms back to the host (one synchronising
// copy per pass); the rescale factors and the merge run on the current stream, and the merge pass
// counts NaN/Inf inputs, read back once at the end (the op raises ValueError, as the CPU kernels do).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../task_vectors.h"
#include "dtypes.cuh"
#include "fused_merge.cuh"
#include "launch.cuh"
#include "magnitude_keys.cuh"
#include "radix_select.cuh"
#include "rescale.cuh"
#include "row_ranks.cuh"

namespace merge_engine {
namespace task_vectors {
namespace {

// NaN / Inf check: count keys at or above the Inf key in each of up to kMaxExperts + 1 tensors.
struct BitsList {
  const void* ptr[kMaxExperts + 1];
};

// counts[t]: the elements of tensor t whose key is at least limit (Inf's key: NaN or Inf; one above: NaN)
template <typename Bits>
__global__ void count_non_finite_kernel(BitsList list, int64_t n, uint32_t mask, uint32_t limit,
                                        unsigned long long* counts) {
  const Bits* x = static_cast<const Bits*>(list.ptr[blockIdx.y]);
  unsigned long long c = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    c += (static_cast<uint32_t>(x[i]) & mask) >= limit;
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const unsigned long long total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0 && total) atomicAdd(counts + blockIdx.y, total);
}

// Raises ValueError, as the CPU kernels do, naming the first tensor with a NaN or Inf (with
// allow_inf, a NaN: +-Inf are the largest magnitudes).
template <typename D>
void check_finite(const std::vector<const D*>& tensors, const std::vector<std::string>& names, int64_t n,
                  const at::TensorOptions& device_options, cudaStream_t stream, bool allow_inf = false) {
  if (n == 0 || tensors.empty()) return;
  using Bits = std::conditional_t<sizeof(D) == 2, uint16_t, uint32_t>;
  BitsList list{};
  for (size_t i = 0; i < tensors.size(); ++i) list.ptr[i] = tensors[i];
  auto counts = at::zeros({static_cast<int64_t>(tensors.size())}, device_options.dtype(at::kLong));
  const uint32_t mask = sizeof(D) == 2 ? 0x7FFFu : 0x7FFFFFFFu;
  dim3 grid(grid_for(n, kThreads, 4), static_cast<unsigned>(tensors.size()));
  count_non_finite_kernel<Bits><<<grid, kThreads, 0, stream>>>(
      list, n, mask, static_cast<uint32_t>(Traits<D>::kInfKey) + (allow_inf ? 1u : 0u),  // NaN keys are above Inf's
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto host = to_host(counts.data_ptr<int64_t>(), tensors.size(), stream);
  for (size_t i = 0; i < tensors.size(); ++i)
    TORCH_CHECK_VALUE(host[i] == 0, names[i], " has ", host[i], allow_inf ? " NaN" : " NaN or Inf",
                      " value(s); a magnitude ordering is undefined");
}

}  // namespace
}  // namespace task_vectors

namespace {

template <typename D> const D* ptr_of(const at::Tensor& t) { return reinterpret_cast<const D*>(t.const_data_ptr()); }

}  // namespace

at::Tensor delta_cutoffs_cuda(const at::Tensor& base, const at::Tensor& expert, const std::vector<int64_t>& counts,
                              bool largest) {
  check_task_vector_inputs(base, {expert}, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(base.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto result = at::empty({static_cast<int64_t>(counts.size()), 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* r = result.data_ptr<int64_t>();
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using D = decltype(tag);
    const int64_t n = base.numel();
    const D* b = ptr_of<D>(base);
    const D* e = ptr_of<D>(expert);
    // no delta is NaN then (an Inf expert value is an Inf magnitude, as ops/select.py orders it)
    task_vectors::check_finite<D>({b}, {"the base"}, n, base.options(), stream);
    task_vectors::check_finite<D>({e}, {"the expert"}, n, base.options(), stream, /*allow_inf=*/true);
    task_vectors::CutoffFinder<D> finder(e, b, n, base.options(), stream);
    for (size_t j = 0; j < counts.size(); ++j) {
      auto cut = finder.cutoff(counts[j], largest);
      r[2 * j] = cut[0];
      r[2 * j + 1] = cut[1];
    }
  });
  return result;
}

at::Tensor merge_task_vectors_cuda(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                                   const std::vector<double>& weights, int64_t mode,
                                   const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                   const std::vector<double>& densities, const std::vector<double>& epsilons,
                                   bool consensus, bool normalize, bool rescale, double lambda, int64_t key0,
                                   int64_t key1) {
  check_merge_task_vectors_args(base, experts, weights, mode, counts_lo, counts_hi, densities, epsilons,
                                c10::DeviceType::CUDA, task_vectors::kMaxExperts);
  const size_t K = experts.size();
  c10::cuda::CUDAGuard guard(base.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty_like(base);
  const int64_t n = base.numel();
  if (n == 0) return out;
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using D = decltype(tag);
    const D* b = ptr_of<D>(base);
    task_vectors::MergeArgs<D> a{};
    a.base = b;
    a.out = reinterpret_cast<D*>(out.data_ptr());
    a.n = n;
    a.K = static_cast<int>(K);
    a.mode = static_cast<int>(mode);
    a.consensus = consensus;
    a.normalize = normalize;
    a.lambda = static_cast<float>(lambda);
    a.key0 = static_cast<uint32_t>(key0);
    a.key1 = static_cast<uint32_t>(key1);
    float weight_sum = 0.f;
    for (size_t i = 0; i < K; ++i) {
      a.experts[i] = ptr_of<D>(experts[i]);
      a.weights[i] = task_vectors::host_round<D>(static_cast<float>(weights[i]));
      weight_sum += a.weights[i];
      a.probs[i] = static_cast<float>(densities[i]);
      for (int c = 0; c < 4; ++c) a.cuts[i][c] = c % 2 ? 0 : kNothingLargest;
      if (mode == kMagnitude || mode == kOutliers) {
        const bool largest = mode == kMagnitude;
        task_vectors::CutoffFinder<D> finder(a.experts[i], b, n, base.options(), stream);
        auto lo = finder.cutoff(counts_lo[i], largest);
        auto hi = finder.cutoff(counts_hi[i], largest);
        a.cuts[i][0] = lo[0];
        a.cuts[i][1] = lo[1];
        a.cuts[i][2] = hi[0];
        a.cuts[i][3] = hi[1];
      }
    }
    const float all_divisor = task_vectors::host_round<D>(weight_sum);
    // |sum| < 1e-8 compared in D, as torch compares the reference's: fp16's 1e-8 is 0, so a zero sum stays
    a.all_divisor = std::fabs(all_divisor) < task_vectors::host_round<D>(1e-8f) ? 1.f : all_divisor;
    // DELLA: keep flags of every expert's draws, from ranks within rows (a 1-D tensor is one row)
    at::Tensor rank_keep;
    if (mode == kRank) {
      const int64_t rows = base.dim() < 2 ? 1 : base.size(0);
      const int64_t cols = n / rows;
      rank_keep = at::empty({static_cast<int64_t>(K), n}, base.options().dtype(at::kByte));
      for (size_t i = 0; i < K; ++i) {
        if (!(a.probs[i] > 0.f && a.probs[i] < 1.f)) continue;  // keep_of decides without draws
        task_vectors::della_keep_flags<D>(a.experts[i], b, rows, cols, densities[i],
                                          epsilons.empty() ? 0.0 : epsilons[i], static_cast<uint32_t>(i), a.key0,
                                          a.key1, rank_keep.data_ptr<uint8_t>() + i * n, base.options(), stream);
      }
      a.rank_keep = rank_keep.data_ptr<uint8_t>();
    }
    at::Tensor factors;
    if (rescale && mode != kNone && K > 0) {
      factors = mode == kMagnitude || mode == kOutliers
                    ? task_vectors::cutoff_rescale_factors<D>(a, base, experts, stream)
                    : task_vectors::l1_rescale_factors<D>(a, base.options(), stream);
      a.factors = factors.data_ptr<float>();
    }
    // NaN/Inf are counted by the merge pass, which reads every input anyway; until then they only
    // make the cut-offs, draws and factors meaningless (their keys stay in range), and the result
    // is discarded with the error, as in the CPU kernels.
    auto non_finite = at::zeros({static_cast<int64_t>(K) + 1}, base.options().dtype(at::kLong));
    a.non_finite = reinterpret_cast<unsigned long long*>(non_finite.data_ptr<int64_t>());
    task_vectors::launch_merge<D>(a, stream);
    const auto bad = task_vectors::to_host(non_finite.data_ptr<int64_t>(), K + 1, stream);
    for (size_t i = 0; i <= K; ++i)
      TORCH_CHECK_VALUE(bad[i] == 0, i == 0 ? std::string("the base") : "expert " + std::to_string(i - 1), " has ",
                        bad[i], " NaN or Inf value(s); a magnitude ordering is undefined");
  });
  return out;
}

}  // namespace merge_engine
