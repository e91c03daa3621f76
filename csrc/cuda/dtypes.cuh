// Storage dtypes of the CUDA kernels (mirrors csrc/cpu/dtypes.h): float <-> T conversions that round
// to nearest even as torch does, and a dispatch over the kernel dtypes (float32, bfloat16, float16).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace merge_engine {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Device: values of T are carried as floats; from_f rounds a float to T, round_f to T and back.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename D> __device__ __forceinline__ D from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

template <typename D> __device__ __forceinline__ float round_f(float x) { return to_f(from_f<D>(x)); }
template <> __device__ __forceinline__ float round_f<float>(float x) { return x; }

// Calls f(D{}) for the tensor's dtype (float64 stays with the reference).
template <typename F> void dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK(false, "merge_engine CUDA kernel: dtype must be float32, bfloat16 or float16, got ", dt);
  }
}

// The kernel dtypes, for the explicit instantiations of a template that one file defines and others call:
// #define INSTANTIATE(D) template void f<D>(const D*); then ME_FOR_KERNEL_DTYPES(INSTANTIATE).
#define ME_FOR_KERNEL_DTYPES(M) M(float) M(__nv_bfloat16) M(__half)

}  // namespace merge_engine
