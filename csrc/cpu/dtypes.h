// Storage dtypes of the CPU kernels: float <-> T conversions that round exactly as torch does, and
// a dispatch over the kernel dtypes (float32, bfloat16, float16).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace merge_engine {

template <typename T> inline float to_f(T x) { return static_cast<float>(x); }
template <typename T> inline T round_to(float x) { return static_cast<T>(x); }  // round to nearest even
// bf16: the same round-to-nearest-even as c10, its NaN test a select so loops vectorise. Without it a NaN
// whose low bits are set (0x7FFFFFFF, the NaN a GPU computes) would carry into the sign bit and become -0.
template <> inline c10::BFloat16 round_to<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// x rounded to T and back to float, in a form the compiler vectorises (bf16: integer ops only).
template <typename T> inline float rnd(float x) { return to_f(round_to<T>(x)); }
template <> inline float rnd<float>(float x) { return x; }
template <> inline float rnd<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = x != x ? 0x7FC00000u : (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;  // NaN: as round_to
  float rounded;
  std::memcpy(&rounded, &bits, 4);
  return rounded;
}

// Calls f(T{}) for the tensor's dtype T among the kernel dtypes (float64 stays with the reference).
template <typename F> inline void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "merge_engine CPU kernel: dtype must be float32, bfloat16 or float16, got ", dt);
  }
}

// The kernel dtypes, for the explicit instantiations of a template that one file defines and others call:
// #define INSTANTIATE(T) template void f<T>(const T*); then ME_FOR_KERNEL_DTYPES(INSTANTIATE).
#define ME_FOR_KERNEL_DTYPES(M) M(float) M(c10::BFloat16) M(c10::Half)

}  // namespace merge_engine
