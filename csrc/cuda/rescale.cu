// mergekit's L1 rescale factors on the GPU, a pass before the merge: per expert, the sum of |delta|
// over its sum over the kept elements (keep_of in fused_merge.cuh). For the random and rank modes the
// sums are taken in fp64, as per-block partials combined in a fixed tree, so the result is deterministic
// run to run; their order differs from the reference's (see fused_merge.cu). The cut-off modes' are
// torch's sums, as the reference's (csrc/cpu/rescale.cpp: cutoff_rescale_factors).
#include <ATen/ATen.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "fused_merge.cuh"
#include "launch.cuh"
#include "rescale.cuh"

namespace merge_engine::task_vectors {

namespace {

constexpr int kL1Blocks = 1024;  // fixed partial count of the L1 sums: deterministic on every GPU

// mergekit's L1 rescale factor per expert: |delta|_1 / |kept|_1 in T, none when either is < 1e-7.
// Pass 1: per-block fp64 partials (grid x: kL1Blocks at most, y: expert), in a fixed order.
template <typename D>
__global__ void l1_partials_kernel(const MergeArgs<D> a, double* partials) {
  const int i = blockIdx.y;
  const int64_t groups = (a.n + 3) / 4;
  double before = 0.0, after = 0.0;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < groups;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g0 = q * 4;
    float u[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.mode == kRandom && a.probs[i] < 1.f) uniform4(static_cast<uint64_t>(q), static_cast<uint32_t>(i), a.key0, a.key1, u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t g = g0 + j;
      if (g < a.n) {
        const float d = delta_f<D>(a.experts[i], a.base, g);
        const double v = fabs(static_cast<double>(d));
        before += v;
        if (keep_of<D>(a, i, g, d, u[j])) after += v;
      }
    }
  }
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double b = Reduce(tmp).Sum(before);
  __syncthreads();
  const double s = Reduce(tmp).Sum(after);
  if (threadIdx.x == 0) {
    partials[(static_cast<int64_t>(i) * gridDim.x + blockIdx.x) * 2] = b;
    partials[(static_cast<int64_t>(i) * gridDim.x + blockIdx.x) * 2 + 1] = s;
  }
}

// Pass 2: one block per expert combines its partials (fixed order) and forms the factor.
template <typename D>
__global__ void l1_factors_kernel(const MergeArgs<D> a, const double* partials, int blocks, float* factors) {
  const int i = blockIdx.x;
  double before = 0.0, after = 0.0;
  for (int k = threadIdx.x; k < blocks; k += blockDim.x) {
    before += partials[(static_cast<int64_t>(i) * blocks + k) * 2];
    after += partials[(static_cast<int64_t>(i) * blocks + k) * 2 + 1];
  }
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const double b = Reduce(tmp).Sum(before);
  __syncthreads();
  const double s = Reduce(tmp).Sum(after);
  if (threadIdx.x == 0) {  // fp16's in fp32 (drawn masks: csrc/cpu/rescale.cpp, kHalf)
    using U = std::conditional_t<std::is_same_v<D, __half>, float, D>;
    const float bt = round_f<U>(static_cast<float>(b));
    const float at = round_f<U>(static_cast<float>(s));
    factors[i] = !rescaled(a, i) || bt < 1e-7f || at < 1e-7f ? 1.f : round_f<U>(bt / at);
  }
}

// Expert i's keep flags under a cut-off mode, one byte per element.
template <typename D>
__global__ void cutoff_keep_kernel(const MergeArgs<D> a, int i, uint8_t* keep) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < a.n;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x)
    keep[g] = keep_of<D>(a, i, g, delta_f<D>(a.experts[i], a.base, g), 0.f);
}

}  // namespace

template <typename D>
at::Tensor cutoff_rescale_factors(const MergeArgs<D>& a, const at::Tensor& base,
                                  const std::vector<at::Tensor>& experts, cudaStream_t stream) {
  std::vector<float> factors(a.K, 1.f);  // none where a norm is < 1e-7 (a NaN norm is not: the factor is NaN)
  for (int i = 0; i < a.K; ++i) {
    if (!rescaled(a, i)) continue;
    const at::Tensor magnitude = at::sub(experts[i], base).abs_();  // |delta| in T, as the reference
    at::Tensor keep = at::empty({a.n}, base.options().dtype(at::kByte));
    cutoff_keep_kernel<D><<<grid_for(a.n, kThreads), kThreads, 0, stream>>>(a, i, keep.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    float before = magnitude.sum().item<float>(), after;
    if constexpr (std::is_same_v<D, __half>) {  // |delta| kept whole: a norm that overflows fp16 is taken again in fp32
      const at::Tensor kept = magnitude * keep.view(magnitude.sizes());
      after = kept.sum().item<float>();
      if (!(std::isfinite(before) && std::isfinite(after))) {
        before = magnitude.to(at::kFloat).sum().item<float>(), after = kept.to(at::kFloat).sum().item<float>();
        if (!(before < 1e-7f || after < 1e-7f)) factors[i] = before / after;  // in fp32 (csrc/cpu/rescale.cpp)
        continue;
      }
    } else {
      after = magnitude.mul_(keep.view(magnitude.sizes())).sum().item<float>();  // |delta| * keep
    }
    if (!(before < 1e-7f || after < 1e-7f)) factors[i] = host_round<D>(before / after);
  }
  return at::tensor(factors, at::TensorOptions().dtype(at::kFloat)).to(base.device());
}

template <typename D>
at::Tensor l1_rescale_factors(const MergeArgs<D>& a, const at::TensorOptions& options, cudaStream_t stream) {
  const int64_t K = a.K, n = a.n;
  auto factors = at::empty({K}, options.dtype(at::kFloat));
  const int blocks = static_cast<int>(std::min<int64_t>(kL1Blocks, ceil_div(ceil_div(n, 4), kThreads)));
  auto partials = at::empty({K, blocks, 2}, options.dtype(at::kDouble));
  l1_partials_kernel<D><<<dim3(blocks, static_cast<unsigned>(K)), kThreads, 0, stream>>>(
      a, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  l1_factors_kernel<D><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(a, partials.data_ptr<double>(),
                                                                           blocks, factors.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return factors;
}

#define INSTANTIATE(D)                                                                                      \
  template at::Tensor l1_rescale_factors<D>(const MergeArgs<D>&, const at::TensorOptions&, cudaStream_t);   \
  template at::Tensor cutoff_rescale_factors<D>(const MergeArgs<D>&, const at::Tensor&,                     \
                                                const std::vector<at::Tensor>&, cudaStream_t);
ME_FOR_KERNEL_DTYPES(INSTANTIATE)
#undef INSTANTIATE

}  // namespace merge_engine::task_vectors
