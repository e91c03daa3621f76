// Shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of the task-vector family (TIES, DARE,
// breadcrumbs, DELLA): Philox bits, magnitude keys, cut-off tests, and rounding to the compute dtype.
// The Python references in merge_engine/ops/ define the results; every helper here mirrors one step
// of them. Last, the argument checks of the family's entry points (csrc/cpu/task_vectors.cpp,
// csrc/cuda/task_vectors.cu), which both backends make alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__CUDACC__)
#define ME_HD __host__ __device__ __forceinline__
#else
#define ME_HD inline
#endif

namespace merge_engine {

// Sparsification modes, as in merge_task_vectors(sparsify=...).
enum Mode : int { kNone = 0, kMagnitude = 1, kRandom = 2, kOutliers = 3, kRank = 4 };

// Cut-off selecting nothing (ops/select.py): descending and ascending orders.
constexpr int64_t kNothingLargest = INT64_MAX;
constexpr int64_t kNothingSmallest = -1;

// ---- Philox4x32-10 (ops/random.py): element i of stream s is word i % 4 of
// philox(counter = (i / 4 low, i / 4 high, s, 0), key). ----
ME_HD void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

ME_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(c[0], 0xD2511F53u, hi0, lo0);
    mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
    uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The four uniforms of block b (elements 4b..4b+3) of one stream: (bits >> 8) * 2^-24.
ME_HD void uniform4(uint64_t block, uint32_t stream, uint32_t k0, uint32_t k1, float u[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, 0u};
  philox4x32_10(c, k0, k1);
  for (int j = 0; j < 4; ++j) u[j] = static_cast<float>(c[j] >> 8) * 5.9604644775390625e-08f;
}

// ---- magnitude keys: |x|'s bit pattern as an integer (ops/select.py) ----
ME_HD int64_t key_of_bits16(uint16_t bits) { return bits & 0x7FFF; }
ME_HD int64_t key_of_float(float x) {
  uint32_t b;
#if defined(__CUDA_ARCH__)
  b = __float_as_uint(x);
#else
  std::memcpy(&b, &x, 4);
#endif
  return b & 0x7FFFFFFFu;
}

// Membership in the first `count` elements of the stable order, given its cut-off (T, c).
ME_HD bool selected(int64_t key, int64_t index, int64_t t, int64_t c, bool largest) {
  return (largest ? key > t : key < t) || (key == t && index < c);
}

// Per-expert keep rule of the fused merge: for magnitude (largest) and outliers (ascending),
// keep = first(hi) minus first(lo); cut[] = {lo_T, lo_c, hi_T, hi_c}.
ME_HD bool keep_by_cutoffs(int64_t key, int64_t index, const int64_t cut[4], bool largest) {
  return selected(key, index, cut[2], cut[3], largest) && !selected(key, index, cut[0], cut[1], largest);
}

// Keys at or above this are NaN (Inf is the limit itself), per storage width.
constexpr int64_t kInfKey16Half = 0x7C00, kInfKey16BFloat = 0x7F80, kInfKey32 = 0x7F800000;

// ---- argument checks of the entry points, on the host; `device` is the backend's device type ----

// base and experts: contiguous tensors of one shape and one kernel dtype (float32, bfloat16, float16),
// all on the base's device.
inline void check_task_vector_inputs(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                                     c10::DeviceType device) {
  const auto where = c10::DeviceTypeName(device);
  TORCH_CHECK(base.device().type() == device, "merge_engine ", where, " kernel: base must be a ", where, " tensor");
  TORCH_CHECK(base.is_contiguous(), "merge_engine ", where, " kernel: base must be contiguous");
  const auto dt = base.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "merge_engine ", where,
              " kernel: dtype must be float32, bfloat16 or float16, got ", dt);
  for (const auto& x : experts) {
    TORCH_CHECK(x.device() == base.device() && x.is_contiguous(), "merge_engine ", where,
                " kernel: experts must be contiguous ", where, " tensors on the base's device");
    TORCH_CHECK(x.scalar_type() == dt, "merge_engine ", where, " kernel: experts must have the base's dtype");
    TORCH_CHECK(x.sizes() == base.sizes(), "merge_engine ", where, " kernel: experts must have the base's shape");
  }
}

// merge_task_vectors: the inputs as above, at most max_experts experts (the CUDA launch carries
// their pointers), one weight and density per expert, a (lo, hi) selection count per expert in the
// magnitude and outliers modes, and one epsilon per expert in the rank mode (none or one otherwise).
inline void check_merge_task_vectors_args(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                                          const std::vector<double>& weights, int64_t mode,
                                          const std::vector<int64_t>& counts_lo,
                                          const std::vector<int64_t>& counts_hi,
                                          const std::vector<double>& densities, const std::vector<double>& epsilons,
                                          c10::DeviceType device, size_t max_experts = SIZE_MAX) {
  check_task_vector_inputs(base, experts, device);
  const size_t K = experts.size();
  TORCH_CHECK(K <= max_experts, "merge_engine ", c10::DeviceTypeName(device), " kernel: at most ", max_experts,
              " experts per call, got ", K);
  TORCH_CHECK(weights.size() == K && densities.size() == K, "merge_engine: one weight and density per expert");
  TORCH_CHECK(mode >= kNone && mode <= kRank, "merge_engine: unknown sparsification mode ", mode);
  TORCH_CHECK((mode != kMagnitude && mode != kOutliers) || (counts_lo.size() == K && counts_hi.size() == K),
              "merge_engine: one (lo, hi) selection count per expert");
  TORCH_CHECK(mode == kRank ? epsilons.size() == K : epsilons.empty() || epsilons.size() == K,
              "merge_engine: one epsilon per expert", mode == kRank ? "" : " (or none)");
}

// philox_uniforms: elements start .. start + numel - 1 of a stream.
inline void check_philox_uniforms_args(int64_t start, int64_t numel) {
  TORCH_CHECK(start >= 0 && numel >= 0, "merge_engine: philox_uniforms needs start >= 0 and numel >= 0");
}

}  // namespace merge_engine
