// Magnitude keys of the task-vector family's CUDA kernels (mirrors csrc/cpu/magnitude_keys.h): the key
// of a value of T (the bit pattern of |x|, ../task_vectors.h) and of a delta expert - base formed as
// the reference forms it, per dtype with its traits. Device functions, inlined into every kernel.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../task_vectors.h"
#include "dtypes.cuh"

namespace merge_engine::task_vectors {

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

}  // namespace merge_engine::task_vectors
