// CUDA kernels of the Fisher family (merge_engine/ops/fisher.py), mirroring csrc/cpu/fisher.cpp: the
// in-place accumulation F += scale * g^2, and the Fisher-weighted average of K tensors in one pass.
//
// Every step is the reference's fp32 operation, in the reference's order, rounded once, so results
// are bit-identical to the PyTorch references and to the CPU kernels: built with -fmad=false (a fused
// multiply-add would round differently), IEEE division and conversions (no fast math; stores to
// bf16/fp16 round to nearest even), scalars rounded to fp32 on the host as torch.tensor(x,
// dtype=float32) does, model 0 starting num and den (num = term_0, not 0 + term_0, which differs in
// the sign of a zero), and max(F, floor) keeping F on a tie, as std::max in the CPU kernels.
//
// The merge takes any number of models: their pointers, coefficients and floors travel in a small
// table copied to the device. Negative, NaN and Inf Fisher values are counted per model by the merge
// pass itself (which reads every Fisher anyway), read back once after it, and reported as ValueError
// naming the first bad model, as the CPU kernels and the reference do.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

#include "../fisher.h"
#include "dtypes.cuh"

namespace merge_engine {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // elements per thread and tile: each model's table entry is read once a tile
constexpr int64_t kTile = int64_t{kThreads} * kPerThread;

// Grid-stride launches: enough blocks to fill the device, no more than the work needs.
int grid_for(int64_t blocks_of_work) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks_of_work, int64_t{sms} * 8)));
}

// ---- accumulate_fisher ----

template <typename F, typename G>
__global__ void accumulate_fisher_kernel(F* fisher, const G* grad, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_f(grad[i]);
    fisher[i] = from_f<F>(to_f(fisher[i]) + (g * g) * scale);
  }
}

// ---- fisher_merge ----

// One model of the merge: its param and Fisher, and its coefficient and floor rounded to fp32.
template <typename P, typename F>
struct Model {
  const P* param;
  const F* fisher;
  float coefficient, floor_value;
};

// d = max(F, floor) * c of element i; counts a negative, NaN or Inf F in bad.
template <typename P, typename F>
__device__ __forceinline__ float weight_of(const Model<P, F>& m, int64_t i, unsigned long long& bad) {
  const float f = to_f(m.fisher[i]);
  bad += !(f >= 0.f && f <= FLT_MAX);
  return (f < m.floor_value ? m.floor_value : f) * m.coefficient;
}

// Per element: num = sum_j d_j theta_j, den = sum_j d_j (model order); num / den where den > 0,
// else theta_0. Tiles of kTile elements, element r * kThreads + threadIdx.x of a tile per thread
// (coalesced), models in the outer loop so that num and den stay in registers.
template <typename P, typename F>
__global__ void fisher_merge_kernel(const Model<P, F>* models, int K, int64_t n, P* out, unsigned long long* bad) {
  for (int64_t tile = blockIdx.x * kTile; tile < n; tile += static_cast<int64_t>(gridDim.x) * kTile) {
    float num[kPerThread], den[kPerThread];
    for (int j = 0; j < K; ++j) {
      const Model<P, F> m = models[j];
      unsigned long long model_bad = 0;
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const int64_t i = tile + r * kThreads + threadIdx.x;
        if (i < n) {
          const float d = weight_of(m, i, model_bad);
          const float term = d * to_f(m.param[i]);
          num[r] = j == 0 ? term : num[r] + term;
          den[r] = j == 0 ? d : den[r] + d;
        }
      }
      if (model_bad) atomicAdd(bad + j, model_bad);  // rare: reported after the pass
    }
    const P* first = models[0].param;
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) {
      const int64_t i = tile + r * kThreads + threadIdx.x;
      if (i < n) out[i] = den[r] > 0.f ? from_f<P>(num[r] / den[r]) : first[i];
    }
  }
}

// ---- host helpers ----

template <typename D> const D* ptr_of(const at::Tensor& t) { return reinterpret_cast<const D*>(t.const_data_ptr()); }

// The merge of one (params dtype, Fishers dtype) pair, counting bad Fisher values into bad[K].
template <typename P, typename F>
void launch_merge(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& fishers,
                  const std::vector<double>& coefficients, const std::vector<double>& floors, at::Tensor& out,
                  at::Tensor& bad, cudaStream_t stream) {
  const int64_t K = static_cast<int64_t>(params.size()), n = out.numel();
  std::vector<Model<P, F>> host(K);
  for (int64_t j = 0; j < K; ++j)
    host[j] = {ptr_of<P>(params[j]), ptr_of<F>(fishers[j]), static_cast<float>(coefficients[j]),
               static_cast<float>(floors[j])};
  const int64_t bytes = K * static_cast<int64_t>(sizeof(Model<P, F>));
  auto table = at::empty({bytes}, out.options().dtype(at::kByte));
  // from pageable memory: staged before the call returns, so `host` may go right after
  C10_CUDA_CHECK(cudaMemcpyAsync(table.data_ptr(), host.data(), bytes, cudaMemcpyHostToDevice, stream));
  fisher_merge_kernel<P, F><<<grid_for(ceil_div(n, kTile)), kThreads, 0, stream>>>(
      reinterpret_cast<const Model<P, F>*>(table.const_data_ptr()), static_cast<int>(K), n,
      reinterpret_cast<P*>(out.data_ptr()), reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void accumulate_fisher_cuda(const at::Tensor& fisher, const at::Tensor& grad, double scale) {
  check_accumulate_fisher_args(fisher, grad, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(fisher.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t n = fisher.numel();
  dispatch_dtype(fisher.scalar_type(), [&](auto f_tag) {
    using F = decltype(f_tag);
    dispatch_dtype(grad.scalar_type(), [&](auto g_tag) {
      using G = decltype(g_tag);
      if (n == 0) return;  // after the dispatch: empty tensors of other dtypes are still rejected
      accumulate_fisher_kernel<F, G><<<grid_for(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
          reinterpret_cast<F*>(fisher.data_ptr()), ptr_of<G>(grad), n, static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor fisher_merge_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& fishers,
                             const std::vector<double>& coefficients, const std::vector<double>& floors) {
  const size_t K = params.size();
  check_fisher_merge_args(params, fishers, coefficients, floors, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty_like(params[0]);
  auto bad = at::zeros({static_cast<int64_t>(K)}, out.options().dtype(at::kLong));
  dispatch_dtype(params[0].scalar_type(), [&](auto p_tag) {
    using P = decltype(p_tag);
    dispatch_dtype(fishers[0].scalar_type(), [&](auto f_tag) {
      using F = decltype(f_tag);
      if (out.numel() > 0) launch_merge<P, F>(params, fishers, coefficients, floors, out, bad, stream);
    });
  });
  std::vector<int64_t> counts(K);
  C10_CUDA_CHECK(cudaMemcpyAsync(counts.data(), bad.const_data_ptr(), K * sizeof(int64_t), cudaMemcpyDeviceToHost,
                                 stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (size_t j = 0; j < K; ++j)
    TORCH_CHECK_VALUE(counts[j] == 0, "the Fisher of model ", j, " has ", counts[j],
                      " negative, NaN or Inf value(s); a Fisher is a mean of squares");
  return out;
}

}  // namespace merge_engine
