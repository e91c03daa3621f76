// CUDA kernels of the task-vector family, mirroring csrc/cpu/task_vectors.cpp: exact magnitude
// cut-offs by radix select, and the fused merge of K task vectors (TIES, DARE, breadcrumbs, DELLA,
// task arithmetic) in one elementwise pass.
//
// Every arithmetic step rounds to the compute dtype T exactly where the PyTorch reference
// (merge_engine/ops/consensus.py: merge_task_vectors_reference) rounds, and sums over experts run
// in fp32 in expert order, as in the CPU kernels; so outputs are bit-identical to the CPU kernels
// except for the L1 rescale factor, whose whole-tensor sums are taken in a different order (here:
// fp64, per-block partials combined in a fixed tree, so the result is deterministic run to run),
// and DELLA's offset density - epsilon, formed in fp64 from the given values and rounded once to
// fp32 as the reference does (the CPU kernels subtract the fp32-rounded values: this can move p by
// one fp32 ulp, which changes a draw with probability ~2^-26 per element).
// DELLA ranks come from a stable segmented radix sort of each row's keys (cub), in row chunks.
// Built with -fmad=false: a fused multiply-add would round differently from torch and from the CPU
// build (-ffp-contract=off). Division and conversions are IEEE round-to-nearest-even (no fast math).
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
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../task_vectors.h"
#include "dtypes.cuh"

namespace merge_engine {
namespace {

constexpr int kMaxExperts = 16;  // experts per fused launch (pointers travel in the kernel arguments)
constexpr int kThreads = 256;
constexpr int kHistThreads = 512;
constexpr int kL1Blocks = 1024;  // fixed partial count of the L1 sums: deterministic on every GPU
constexpr int64_t kSortChunk = int64_t{1} << 24;  // elements per segmented sort of DELLA rows


// ---- dtype traits: D is the device storage type, H the c10 type used on the host ----
template <typename D> struct Traits;
template <> struct Traits<float> {
  using H = float;
  using SortKey = uint32_t;
  static constexpr int kKeyBits = 31;
  static constexpr int64_t kInfKey = kInfKey32;
};
template <> struct Traits<__nv_bfloat16> {
  using H = c10::BFloat16;
  using SortKey = uint16_t;
  static constexpr int kKeyBits = 15;
  static constexpr int64_t kInfKey = kInfKey16BFloat;
};
template <> struct Traits<__half> {
  using H = c10::Half;
  using SortKey = uint16_t;
  static constexpr int kKeyBits = 15;
  static constexpr int64_t kInfKey = kInfKey16Half;
};

// Host rounding to T, through the c10 types as the CPU kernels and torch.tensor(..., dtype=T) do.
template <typename D> float host_round(float x) {
  return static_cast<float>(static_cast<typename Traits<D>::H>(x));
}

// Magnitude key of a value already exact in T (the conversion back to T is exact).
template <typename D> __device__ __forceinline__ int64_t key_f(float x);
template <> __device__ __forceinline__ int64_t key_f<float>(float x) { return key_of_float(x); }
template <> __device__ __forceinline__ int64_t key_f<__nv_bfloat16>(float x) {
  return key_of_bits16(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
}
template <> __device__ __forceinline__ int64_t key_f<__half>(float x) {
  return key_of_bits16(__half_as_ushort(__float2half_rn(x)));
}

// The delta as the reference forms it: expert - base in T (computed in fp32, rounded once).
template <typename D> __device__ __forceinline__ float delta_f(const D* e, const D* b, int64_t i) {
  return round_f<D>(to_f(e[i]) - to_f(b[i]));
}
template <typename D> __device__ __forceinline__ int64_t delta_key(const D* e, const D* b, int64_t i) {
  return key_f<D>(delta_f<D>(e, b, i));
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

int grid_for(int64_t work_items, int threads, int per_sm = 8) {
  const int64_t cap = static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount)) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(work_items, threads), cap)));
}

template <typename V> std::vector<V> to_host(const V* device_ptr, size_t count, cudaStream_t stream) {
  std::vector<V> host(count);
  if (count) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host.data(), device_ptr, count * sizeof(V), cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  return host;
}

// ---------------------------------------------------------------------------------------------
// NaN / Inf check: count keys at or above the Inf key in each of up to kMaxExperts + 1 tensors.
// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Radix select: the cut-off (T, c) of the first `count` elements of the stable order of the keys
// of |expert - base| (ops/select.py). 15-bit keys (16-bit types): one 32768-bin histogram; 31-bit
// keys (fp32): 65536 bins of the high 16 bits, then 32768 bins of the low 15 bits of the keys in
// the chosen high bin. Only if the cut-off key is shared by more elements than the selection needs,
// per-block counts of equal keys locate the block of the cut, and one block finds the index.
// ---------------------------------------------------------------------------------------------
struct HistSpec {
  int shift;             // bin = (key >> shift) & mask
  uint32_t mask;
  int filter_shift;      // only keys with (key >> filter_shift) == filter_value count
  int64_t filter_value;
  int slice_bins;        // bins held by one block's shared sub-histogram (blockIdx.y: the slice)
};

template <typename D>
__global__ void histogram_kernel(const D* e, const D* b, int64_t n, HistSpec spec, unsigned long long* hist) {
  extern __shared__ uint32_t sub[];
  const int lo = blockIdx.y * spec.slice_bins;
  for (int j = threadIdx.x; j < spec.slice_bins; j += blockDim.x) sub[j] = 0;
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = delta_key<D>(e, b, i);
    if ((key >> spec.filter_shift) != spec.filter_value) continue;
    const int bin = static_cast<int>((key >> spec.shift) & spec.mask) - lo;
    if (bin >= 0 && bin < spec.slice_bins) atomicAdd(sub + bin, 1u);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < spec.slice_bins; j += blockDim.x)
    if (sub[j]) atomicAdd(hist + lo + j, static_cast<unsigned long long>(sub[j]));
}

template <typename D>
__global__ void count_equal_kernel(const D* e, const D* b, int64_t n, int64_t t, int64_t chunk, long long* counts) {
  const int64_t start = blockIdx.x * chunk, end = std::min(n, start + chunk);
  long long c = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) c += delta_key<D>(e, b, i) == t;
  using Reduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const long long total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// One block: the index of the need-th (1-based) element of [start, end) whose key is t.
template <typename D>
__global__ void find_nth_equal_kernel(const D* e, const D* b, int64_t start, int64_t end, int64_t t, int64_t need,
                                      long long* result) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ long long found;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  int64_t seen = 0;
  for (int64_t tile = start; tile < end; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const int flag = i < end && delta_key<D>(e, b, i) == t;
    int before, total;
    Scan(tmp).ExclusiveSum(flag, before, total);
    if (flag && seen + before + 1 == need) found = i;  // exactly one thread
    seen += total;                                      // block-wide: the loop exit is uniform
    __syncthreads();
    if (seen >= need) break;
  }
  if (threadIdx.x == 0) *result = found;
}

// Find the bin holding ascending rank r (0-based) and the number of elements below that bin.
std::pair<int, int64_t> bin_of_rank(const std::vector<int64_t>& hist, int64_t r) {
  int64_t below = 0;
  for (size_t b = 0; b < hist.size(); ++b) {
    if (below + hist[b] > r) return {static_cast<int>(b), below};
    below += hist[b];
  }
  TORCH_CHECK(false, "radix select: rank out of range");
}

// Cut-offs of one (base, expert) pair; histograms are shared by every count asked of it.
template <typename D>
class CutoffFinder {
 public:
  CutoffFinder(const D* e, const D* b, int64_t n, at::TensorOptions device_options, cudaStream_t stream)
      : e_(e), b_(b), n_(n), opts_(device_options), stream_(stream) {}

  std::array<int64_t, 2> cutoff(int64_t count, bool largest) {
    const int64_t n = n_;
    count = std::min(std::max<int64_t>(count, 0), n);
    if (count == 0) return {largest ? kNothingLargest : kNothingSmallest, 0};
    if (count == n) return {largest ? kNothingSmallest : kNothingLargest, 0};  // every key is beyond it
    const int64_t r = largest ? n - count : count - 1;  // ascending rank of the cut-off element
    int64_t t, below, equal;
    if (sizeof(D) == 2) {
      if (top_.empty()) top_ = histogram({0, 0x7FFFu, 62, 0, 0}, 1 << 15);
      auto [bin, lower] = bin_of_rank(top_, r);
      t = bin;
      below = lower;
      equal = top_[bin];
    } else {
      if (top_.empty()) top_ = histogram({15, 0xFFFFu, 62, 0, 0}, 1 << 16);
      auto [hbin, hbelow] = bin_of_rank(top_, r);
      auto& low = low_[hbin];
      if (low.empty()) low = histogram({0, 0x7FFFu, 15, hbin, 0}, 1 << 15);
      auto [lbin, lbelow] = bin_of_rank(low, r - hbelow);
      t = (static_cast<int64_t>(hbin) << 15) | lbin;
      below = hbelow + lbelow;
      equal = low[lbin];
    }
    // Elements with key == t fill ascending ranks [below, below + equal); the selection takes the
    // first `need` of them in index order.
    const int64_t need = largest ? count - (n - below - equal) : count - below;
    if (need == equal) return {t, n};
    TORCH_CHECK(need > 0 && need < equal, "radix select: tie count mismatch");
    return {t, nth_equal(t, need) + 1};
  }

 private:
  std::vector<int64_t> histogram(HistSpec spec, int bins) {
    const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    int slice = bins;
    while (slice > 1024 && static_cast<int64_t>(slice) * 4 > optin) slice /= 2;
    spec.slice_bins = slice;
    const size_t smem = static_cast<size_t>(slice) * sizeof(uint32_t);
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(histogram_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    auto hist = at::zeros({bins}, opts_.dtype(at::kLong));
    dim3 grid(grid_for(ceil_div(n_, 32), kHistThreads, 1), static_cast<unsigned>(bins / slice));
    histogram_kernel<D><<<grid, kHistThreads, smem, stream_>>>(
        e_, b_, n_, spec, reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return to_host(hist.data_ptr<int64_t>(), static_cast<size_t>(bins), stream_);
  }

  int64_t nth_equal(int64_t t, int64_t need) {
    const int64_t chunk = std::max<int64_t>(4096, ceil_div(ceil_div(n_, 65536), kThreads) * kThreads);
    const int64_t blocks = ceil_div(n_, chunk);
    auto counts = at::empty({blocks}, opts_.dtype(at::kLong));
    auto* counts_ptr = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
    count_equal_kernel<D><<<static_cast<unsigned>(blocks), kThreads, 0, stream_>>>(e_, b_, n_, t, chunk, counts_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto host = to_host(counts_ptr, static_cast<size_t>(blocks), stream_);
    int64_t seen = 0;  // exclusive scan until the block holding the need-th equal key
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (seen + host[blk] >= need) {
        auto result = at::empty({1}, opts_.dtype(at::kLong));
        auto* result_ptr = reinterpret_cast<long long*>(result.data_ptr<int64_t>());
        find_nth_equal_kernel<D><<<1, kThreads, 0, stream_>>>(e_, b_, blk * chunk, std::min(n_, (blk + 1) * chunk),
                                                              t, need - seen, result_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const long long index = to_host(result_ptr, 1, stream_)[0];
        TORCH_CHECK(index >= 0, "radix select: tie count mismatch");
        return index;
      }
      seen += host[blk];
    }
    TORCH_CHECK(false, "radix select: tie count mismatch");
  }

  const D* e_;
  const D* b_;
  int64_t n_;
  at::TensorOptions opts_;
  cudaStream_t stream_;
  std::vector<int64_t> top_;
  std::map<int, std::vector<int64_t>> low_;
};

// ---------------------------------------------------------------------------------------------
// The fused merge.
// ---------------------------------------------------------------------------------------------
template <typename D>
struct MergeArgs {
  const D* base;
  const D* experts[kMaxExperts];
  D* out;
  int64_t n;
  int K, mode;
  bool consensus, normalize;
  float lambda;
  float all_divisor;                 // sum of the weights in T, 1 when |sum| < 1e-8 (no consensus)
  uint32_t key0, key1;
  float weights[kMaxExperts];        // already rounded to T, as torch.tensor(weights, dtype=T)
  float probs[kMaxExperts];          // random, rank: density
  int64_t cuts[kMaxExperts][4];      // magnitude / outliers: {lo_T, lo_c, hi_T, hi_c}
  const float* factors;              // L1 rescale per expert (NaN: none), or null
  const uint8_t* rank_keep;          // rank: [K][n] keep flags of DELLA's draws, or null
  unsigned long long* non_finite;    // [K + 1]: NaN/Inf counts of the base, then of each expert
};

// Whether element g (delta d, uniform u of its Philox word) of expert i survives sparsification.
template <typename D>
__device__ __forceinline__ bool keep_of(const MergeArgs<D>& a, int i, int64_t g, float d, float u) {
  switch (a.mode) {
    case kMagnitude: return keep_by_cutoffs(key_f<D>(d), g, a.cuts[i], true);
    case kOutliers: return keep_by_cutoffs(key_f<D>(d), g, a.cuts[i], false);
    case kRandom: return a.probs[i] >= 1.f || u < a.probs[i];
    case kRank: return a.probs[i] >= 1.f || (a.probs[i] > 0.f && a.rank_keep[i * a.n + g] != 0);
    default: return true;
  }
}

// Each thread takes groups of 4 consecutive elements: one Philox call serves the group.
template <typename D>
__global__ void merge_kernel(const MergeArgs<D> a) {
  __shared__ float factors[kMaxExperts];
  if (threadIdx.x < kMaxExperts)
    factors[threadIdx.x] = a.factors != nullptr && static_cast<int>(threadIdx.x) < a.K ? a.factors[threadIdx.x] : NAN;
  __syncthreads();
  const int K = a.K;
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < groups;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g0 = q * 4;
    const int m = static_cast<int>(a.n - g0 < 4 ? a.n - g0 : 4);
    // weighted (sparsified, rescaled, weighted) deltas, each rounded to T
    float wd[kMaxExperts][4];
#pragma unroll
    for (int i = 0; i < kMaxExperts; ++i) {
      if (i < K) {
        float u[4] = {0.f, 0.f, 0.f, 0.f};
        if (a.mode == kRandom && a.probs[i] < 1.f) uniform4(static_cast<uint64_t>(q), static_cast<uint32_t>(i), a.key0, a.key1, u);
        const float f = factors[i], w = a.weights[i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < m) {
            const int64_t g = g0 + j;
            const float e = to_f(a.experts[i][g]);
            if (!isfinite(e)) atomicAdd(a.non_finite + 1 + i, 1ull);  // rare: reported after the pass
            const float d = round_f<D>(e - to_f(a.base[g]));
            float kept = keep_of<D>(a, i, g, d, u[j]) ? d : round_f<D>(d * 0.f);  // x * 0 keeps the sign of zero
            if (!isnan(f)) kept = round_f<D>(kept * f);
            wd[i][j] = round_f<D>(kept * w);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < m) {
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kMaxExperts; ++i)
          if (i < K) sum += wd[i][j];
        float mixed;
        if (a.consensus) {
          const bool positive = round_f<D>(sum) >= 0.f;  // a zero sum elects +
          float agree_sum = 0.f, agree_w = 0.f;
#pragma unroll
          for (int i = 0; i < kMaxExperts; ++i) {
            if (i < K) {
              const float v = wd[i][j];
              if (positive ? v > 0.f : v < 0.f) {
                agree_sum += v;
                agree_w += a.weights[i];
              }
            }
          }
          mixed = round_f<D>(agree_sum);
          if (a.normalize) {
            float divisor = round_f<D>(agree_w);
            if (divisor == 0.f) divisor = 1.f;
            mixed = round_f<D>(mixed / divisor);
          }
        } else {
          mixed = round_f<D>(sum);
          if (a.normalize) mixed = round_f<D>(mixed / a.all_divisor);
        }
        if (a.lambda != 1.f) mixed = round_f<D>(mixed * a.lambda);
        const int64_t g = g0 + j;
        const float b = to_f(a.base[g]);
        if (!isfinite(b)) atomicAdd(a.non_finite, 1ull);
        a.out[g] = from_f<D>(b + mixed);
      }
    }
  }
}

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
__global__ void l1_factors_kernel(const double* partials, int blocks, float* factors) {
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
  if (threadIdx.x == 0) {
    const float bt = round_f<D>(static_cast<float>(b));
    const float at = round_f<D>(static_cast<float>(s));
    factors[i] = bt >= 1e-7f && at >= 1e-7f ? round_f<D>(bt / at) : NAN;
  }
}

// ---- DELLA: stable ranks of |delta| within rows by a segmented radix sort, then the draws ----
template <typename D, typename Key>
__global__ void della_keys_kernel(const D* e, const D* b, int64_t start, int64_t len, int cols, Key* keys, int* cols_idx) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < len;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[s] = static_cast<Key>(delta_key<D>(e, b, start + s));
    cols_idx[s] = static_cast<int>(s % cols);
  }
}

__global__ void row_offsets_kernel(int* offsets, int rows, int cols) {
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r <= rows; r += gridDim.x * blockDim.x) offsets[r] = r * cols;
}

// Sorted position s of the chunk holds, in its row, ascending rank s % cols; its element draws
// u < p with p = rank / max(cols - 1, 1) * 2 eps + (density - eps) (ops/sparsify.py).
__global__ void della_keep_kernel(int64_t start, int64_t len, int cols, const int* sorted_cols, float denom,
                                  float scale, float base_p, uint32_t stream, uint32_t key0, uint32_t key1,
                                  uint8_t* keep) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < len;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = s / cols, rank = s % cols;
    const int64_t g = start + row * cols + sorted_cols[s];
    float u[4];
    uniform4(static_cast<uint64_t>(g >> 2), stream, key0, key1, u);
    const float p = (static_cast<float>(rank) / denom) * scale + base_p;
    keep[g] = u[g & 3] < p;
  }
}

template <typename D>
void della_keep_flags(const D* e, const D* b, int64_t rows, int64_t cols, double density, double epsilon,
                      uint32_t stream_id, uint32_t key0, uint32_t key1, uint8_t* keep,
                      const at::TensorOptions& opts, cudaStream_t stream) {
  using Key = typename Traits<D>::SortKey;
  TORCH_CHECK(cols <= INT32_MAX / 2, "merge_engine CUDA kernel: DELLA rows longer than 2^30 elements");
  const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(rows, kSortChunk / cols));
  const int64_t cap = chunk_rows * cols;
  auto key_opts = opts.dtype(sizeof(Key) == 2 ? at::kShort : at::kInt);
  auto keys_in = at::empty({cap}, key_opts), keys_out = at::empty({cap}, key_opts);
  auto idx_in = at::empty({cap}, opts.dtype(at::kInt)), idx_out = at::empty({cap}, opts.dtype(at::kInt));
  auto offsets = at::empty({chunk_rows + 1}, opts.dtype(at::kInt));
  Key* kin = reinterpret_cast<Key*>(keys_in.data_ptr());
  Key* kout = reinterpret_cast<Key*>(keys_out.data_ptr());
  int* iin = idx_in.data_ptr<int>();
  int* iout = idx_out.data_ptr<int>();
  int* offs = offsets.data_ptr<int>();
  const float denom = static_cast<float>(std::max<int64_t>(cols - 1, 1));
  const float scale = static_cast<float>(2.0 * epsilon);     // the reference's 2 * epsilon, in fp32
  const float base_p = static_cast<float>(density - epsilon);  // the reference's density - epsilon, in fp32
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t rc = std::min(chunk_rows, rows - r0), len = rc * cols, start = r0 * cols;
    const int grid = grid_for(len, kThreads);
    della_keys_kernel<D, Key><<<grid, kThreads, 0, stream>>>(e, b, start, len, static_cast<int>(cols), kin, iin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_offsets_kernel<<<grid_for(rc + 1, kThreads), kThreads, 0, stream>>>(offs, static_cast<int>(rc), static_cast<int>(cols));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        nullptr, temp_bytes, kin, kout, iin, iout, static_cast<int>(len), static_cast<int>(rc), offs, offs + 1, 0,
        Traits<D>::kKeyBits, stream));
    auto temp = at::empty({static_cast<int64_t>(std::max<size_t>(temp_bytes, 1))}, opts.dtype(at::kByte));
    C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, kin, kout, iin, iout, static_cast<int>(len), static_cast<int>(rc), offs,
        offs + 1, 0, Traits<D>::kKeyBits, stream));
    della_keep_kernel<<<grid, kThreads, 0, stream>>>(start, len, static_cast<int>(cols), iout, denom, scale, base_p,
                                                     stream_id, key0, key1, keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// Host entry points.
// ---------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& base, const std::vector<at::Tensor>& experts) {
  TORCH_CHECK(base.is_cuda(), "merge_engine CUDA kernel: base must be a CUDA tensor");
  TORCH_CHECK(base.is_contiguous(), "merge_engine CUDA kernel: base must be contiguous");
  const auto dt = base.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "merge_engine CUDA kernel: dtype must be float32, bfloat16 or float16, got ", dt);
  for (const auto& x : experts) {
    TORCH_CHECK(x.is_cuda() && x.device() == base.device() && x.is_contiguous(),
                "merge_engine CUDA kernel: experts must be contiguous CUDA tensors on the base's device");
    TORCH_CHECK(x.scalar_type() == dt, "merge_engine CUDA kernel: experts must have the base's dtype");
    TORCH_CHECK(x.sizes() == base.sizes(), "merge_engine CUDA kernel: experts must have the base's shape");
  }
}

template <typename D> const D* ptr_of(const at::Tensor& t) { return reinterpret_cast<const D*>(t.const_data_ptr()); }

}  // namespace

at::Tensor delta_cutoffs_cuda(const at::Tensor& base, const at::Tensor& expert, const std::vector<int64_t>& counts,
                              bool largest) {
  check_inputs(base, {expert});
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
    check_finite<D>({b}, {"the base"}, n, base.options(), stream);
    check_finite<D>({e}, {"the expert"}, n, base.options(), stream, /*allow_inf=*/true);
    CutoffFinder<D> finder(e, b, n, base.options(), stream);
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
  check_inputs(base, experts);
  const size_t K = experts.size();
  TORCH_CHECK(K <= static_cast<size_t>(kMaxExperts), "merge_engine CUDA kernel: at most ", kMaxExperts,
              " experts per call, got ", K);
  TORCH_CHECK(weights.size() == K && densities.size() == K, "merge_engine: one weight and density per expert");
  TORCH_CHECK(mode >= kNone && mode <= kRank, "merge_engine: unknown sparsification mode ", mode);
  if (mode == kMagnitude || mode == kOutliers)
    TORCH_CHECK(counts_lo.size() == K && counts_hi.size() == K, "merge_engine: one selection count pair per expert");
  TORCH_CHECK(epsilons.empty() || epsilons.size() == K, "merge_engine: one epsilon per expert (or none)");
  c10::cuda::CUDAGuard guard(base.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty_like(base);
  const int64_t n = base.numel();
  if (n == 0) return out;
  dispatch_dtype(base.scalar_type(), [&](auto tag) {
    using D = decltype(tag);
    const D* b = ptr_of<D>(base);
    MergeArgs<D> a{};
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
      a.weights[i] = host_round<D>(static_cast<float>(weights[i]));
      weight_sum += a.weights[i];
      a.probs[i] = static_cast<float>(densities[i]);
      for (int c = 0; c < 4; ++c) a.cuts[i][c] = c % 2 ? 0 : kNothingLargest;
      if (mode == kMagnitude || mode == kOutliers) {
        const bool largest = mode == kMagnitude;
        CutoffFinder<D> finder(a.experts[i], b, n, base.options(), stream);
        auto lo = finder.cutoff(counts_lo[i], largest);
        auto hi = finder.cutoff(counts_hi[i], largest);
        a.cuts[i][0] = lo[0];
        a.cuts[i][1] = lo[1];
        a.cuts[i][2] = hi[0];
        a.cuts[i][3] = hi[1];
      }
    }
    const float all_divisor = host_round<D>(weight_sum);
    a.all_divisor = std::fabs(all_divisor) < 1e-8f ? 1.f : all_divisor;
    // DELLA: keep flags of every expert's draws, from ranks within rows (a 1-D tensor is one row)
    at::Tensor rank_keep;
    if (mode == kRank) {
      const int64_t rows = base.dim() < 2 ? 1 : base.size(0);
      const int64_t cols = n / rows;
      rank_keep = at::empty({static_cast<int64_t>(K), n}, base.options().dtype(at::kByte));
      for (size_t i = 0; i < K; ++i) {
        if (!(a.probs[i] > 0.f && a.probs[i] < 1.f)) continue;  // keep_of decides without draws
        della_keep_flags<D>(a.experts[i], b, rows, cols, densities[i], epsilons.empty() ? 0.0 : epsilons[i],
                            static_cast<uint32_t>(i), a.key0, a.key1, rank_keep.data_ptr<uint8_t>() + i * n,
                            base.options(), stream);
      }
      a.rank_keep = rank_keep.data_ptr<uint8_t>();
    }
    at::Tensor factors;
    if (rescale && mode != kNone && K > 0) {
      factors = at::empty({static_cast<int64_t>(K)}, base.options().dtype(at::kFloat));
      const int blocks = static_cast<int>(std::min<int64_t>(kL1Blocks, ceil_div(ceil_div(n, 4), kThreads)));
      auto partials = at::empty({static_cast<int64_t>(K), blocks, 2}, base.options().dtype(at::kDouble));
      l1_partials_kernel<D><<<dim3(blocks, static_cast<unsigned>(K)), kThreads, 0, stream>>>(
          a, partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      l1_factors_kernel<D><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(partials.data_ptr<double>(), blocks,
                                                                               factors.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.factors = factors.data_ptr<float>();
    }
    // NaN/Inf are counted by the merge pass, which reads every input anyway; until then they only
    // make the cut-offs, draws and factors meaningless (their keys stay in range), and the result
    // is discarded with the error, as in the CPU kernels.
    auto non_finite = at::zeros({static_cast<int64_t>(K) + 1}, base.options().dtype(at::kLong));
    a.non_finite = reinterpret_cast<unsigned long long*>(non_finite.data_ptr<int64_t>());
    merge_kernel<D><<<grid_for(ceil_div(n, 4), kThreads), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto bad = to_host(non_finite.data_ptr<int64_t>(), K + 1, stream);
    for (size_t i = 0; i <= K; ++i)
      TORCH_CHECK_VALUE(bad[i] == 0, i == 0 ? std::string("the base") : "expert " + std::to_string(i - 1), " has ",
                        bad[i], " NaN or Inf value(s); a magnitude ordering is undefined");
  });
  return out;
}

}  // namespace merge_engine
