// CUDA kernels of the Gram family (merge_engine/ops/gram.py), mirroring csrc/cpu/gram.cpp: the
// upper triangle of gram [d, d] (fp32) += X^T X over the rows of the activations X [T, d] where the
// mask is True.
//
// One thread block per kTile x kTile tile of the upper triangle (a 1-D grid over the tile pairs
// bi <= bj): it runs over the tokens in steps, stages the two [step, kTile] column slices of X in
// shared memory (masked-out tokens and columns past d as 0, which add nothing), accumulates their
// product in fp32, then adds it to its tile of gram (load, add, store) where col >= row, so the
// strictly lower triangle is never written. Tiles are disjoint: no atomics, deterministic results.
// - bf16 / fp16 on sm_80+: tensor cores through nvcuda::wmma (16x16x16, fp32 accumulators); the
//   products are exact, the sums fp32 (truncating, see tests/csrc/kernel_checks.TENSOR_CORE_UNIT).
// - fp32 (and bf16 / fp16 before sm_80): fp32 multiply and add on the CUDA cores, 4 x 4 outputs per
//   thread; -fmad=false keeps them two correctly rounded operations, within the bound of ops/gram.py.
// No cuBLAS: the extension builds against the c10/cuda headers alone (tests/csrc/test_cuda_compile.py).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "dtypes.cuh"

#include "../gram.h"

namespace merge_engine {
namespace {

constexpr int kTile = 64;  // gram tile edge

// (bi, bj) of tile pair p among the nb (nb + 1) / 2 pairs bi <= bj, row by row.
__device__ __forceinline__ void tile_of(int64_t p, int64_t nb, int64_t& bi, int64_t& bj) {
  bi = 0;
  while (p >= nb - bi) p -= nb - bi++;
  bj = bi + p;
}

// Stages x[t0 + k, c0 + c] for k < kSteps, c < kTile in s[k * ld + c] as S: 0 for tokens past T or
// masked out, and for columns past d. All threads of the block take part.
template <int kSteps, int kLd, typename T, typename S>
__device__ __forceinline__ void stage(S* s, const T* x, const bool* mask, int64_t T_, int64_t d, int64_t t0,
                                      int64_t c0) {
  for (int i = threadIdx.x; i < kSteps * kTile; i += blockDim.x) {
    const int k = i / kTile, c = i % kTile;
    const int64_t t = t0 + k, col = c0 + c;
    const bool keep = t < T_ && col < d && (mask == nullptr || mask[t]);
    s[k * kLd + c] = keep ? from_f<S>(to_f(x[t * d + col])) : from_f<S>(0.f);  // exact: S is T or float
  }
}

// gram[r0 + r, c0 + c] += value where in range and on or above the diagonal.
__device__ __forceinline__ void add_to_gram(float* gram, int64_t d, int64_t r0, int64_t c0, int r, int c,
                                            float value) {
  const int64_t row = r0 + r, col = c0 + c;
  if (row < d && col < d && col >= row) gram[row * d + col] += value;
}

// ---- fp32 multiply-add on the CUDA cores ----

constexpr int kSimtSteps = 16;  // tokens per shared-memory step
constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each: rows ty + 16 i, columns tx + 16 j

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    gram_simt_kernel(float* gram, const T* x, const bool* mask, int64_t T_, int64_t d, int64_t nb) {
  __shared__ float a[kSimtSteps * kTile], b[kSimtSteps * kTile];
  int64_t bi, bj;
  tile_of(blockIdx.x, nb, bi, bj);
  const int64_t r0 = bi * kTile, c0 = bj * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t t0 = 0; t0 < T_; t0 += kSimtSteps) {
    stage<kSimtSteps, kTile>(a, x, mask, T_, d, t0, r0);
    stage<kSimtSteps, kTile>(b, x, mask, T_, d, t0, c0);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kSimtSteps; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = a[k * kTile + ty + 16 * i];
        bv[i] = b[k * kTile + tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) add_to_gram(gram, d, r0, c0, ty + 16 * i, tx + 16 * j, acc[i][j]);
}

// ---- bf16 / fp16 on tensor cores (wmma, sm_80+) ----

constexpr int kWmmaSteps = 32;  // tokens per shared-memory step: two 16-deep k-steps
constexpr int kWmmaThreads = 128;  // 4 warps in 2 x 2, 32 x 32 outputs (2 x 2 fragments) each
constexpr int kLdIn = kTile + 8;  // padded rows: 16 rows of a fragment span 32-byte multiples, fewer bank conflicts
constexpr int kLdOut = kTile + 4;

template <typename T>
__global__ void __launch_bounds__(kWmmaThreads)
    gram_wmma_kernel(float* gram, const T* x, const bool* mask, int64_t T_, int64_t d, int64_t nb) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  // a[k][m] = x[t0 + k, r0 + m], b[k][n] = x[t0 + k, c0 + n]: the tile is a^T b, so a is read as a
  // column-major M x K matrix and b as a row-major K x N one. out holds the tile for the final add.
  __shared__ __align__(32) T a[kWmmaSteps * kLdIn];
  __shared__ __align__(32) T b[kWmmaSteps * kLdIn];
  __shared__ __align__(32) float out[kTile * kLdOut];
  int64_t bi, bj;
  tile_of(blockIdx.x, nb, bi, bj);
  const int64_t r0 = bi * kTile, c0 = bj * kTile;
  const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t t0 = 0; t0 < T_; t0 += kWmmaSteps) {
    stage<kWmmaSteps, kLdIn>(a, x, mask, T_, d, t0, r0);
    stage<kWmmaSteps, kLdIn>(b, x, mask, T_, d, t0, c0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kWmmaSteps; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a + k * kLdIn + wm + 16 * i, kLdIn);
        wmma::load_matrix_sync(fb[i], b + k * kLdIn + wn + 16 * i, kLdIn);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(out + (wm + 16 * i) * kLdOut + wn + 16 * j, acc[i][j], kLdOut, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile; i += kWmmaThreads)
    add_to_gram(gram, d, r0, c0, i / kTile, i % kTile, out[(i / kTile) * kLdOut + i % kTile]);
#else
  __trap();  // never launched: the host takes the CUDA-core kernel for code below sm_80 (has_tensor_cores)
#endif
}

// ---- host ----

// Whether the current device runs gram_wmma_kernel<T>'s tensor-core body: the code it loads for the kernel
// (a cubin, or PTX compiled at load time) was compiled for compute_80 or later. Not the device's own
// capability: a build for older architectures only (TORCH_CUDA_ARCH_LIST=7.5+PTX, say) runs on an sm_80
// device through its compute_75 PTX, whose body is the __trap().
template <typename T> bool has_tensor_cores() {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, gram_wmma_kernel<T>));
  return attributes.ptxVersion >= 80;  // bf16 wmma needs sm_80
}

}  // namespace

void accumulate_gram_cuda(const at::Tensor& gram, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  check_gram_args(gram, x, mask, c10::DeviceType::CUDA);
  const int64_t d = gram.size(0), tokens = x.size(0);
  if (d == 0 || tokens == 0) return;
  c10::cuda::CUDAGuard guard(gram.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t nb = ceil_div(d, kTile), tiles = nb * (nb + 1) / 2;
  const bool* keep = mask ? mask->const_data_ptr<bool>() : nullptr;
  float* g = gram.data_ptr<float>();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xs = reinterpret_cast<const T*>(x.const_data_ptr());
    auto simt = [&] { gram_simt_kernel<T><<<tiles, kSimtThreads, 0, stream>>>(g, xs, keep, tokens, d, nb); };
    if constexpr (std::is_same_v<T, float>)
      simt();
    else if (has_tensor_cores<T>())  // (no wmma instantiation for float: there is no fp32 wmma fragment)
      gram_wmma_kernel<T><<<tiles, kWmmaThreads, 0, stream>>>(g, xs, keep, tokens, d, nb);
    else
      simt();
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace merge_engine
