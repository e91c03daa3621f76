// CUDA kernels of the permute family (merge_engine/ops/permute.py), mirroring csrc/cpu/permute.cpp:
// gather through index tables, its adjoint scatter-add, and disjoint in-place swaps of blocks of
// parameters between the per-layer tensors of one kind.
//
// A tensor is seen as [outer, row] around the block dimension: block b of outer row o is the span
// elements at o * row + b * span. The grid is (tiles of a row) x (outer rows), grid-stride in both;
// a thread moves one unit of a row and finds its block (one division by span, none for one-unit
// spans) and that block's source or target tensor through a device table of the tensors' addresses.
// gather and swap move bits in the widest unit (16, 8, 4 or 2 bytes) that divides the span and
// aligns every tensor, so that rows of a matrix move in 16-byte accesses. scatter-add adds in fp32
// and rounds once to the dtype, to nearest even (__float2bfloat16_rn, __float2half_rn), as torch's
// add does; no multiply is involved, so -fmad=false changes nothing here.
//
// The Python layer validates every index (ranges, distinct pairs: no two threads write one element)
// before calling; it reads them on the device, which these kernels do not repeat.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../permute.h"
#include "dtypes.cuh"

namespace merge_engine {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Calls f(o, r) for every outer row o < outer and position r < width in it.
template <typename F> __device__ __forceinline__ void for_each_position(int64_t outer, int64_t width, F f) {
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y)
    for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < width;
         r += static_cast<int64_t>(gridDim.x) * blockDim.x)
      f(o, r);
}

template <bool kUnit> __device__ __forceinline__ int64_t block_of(int64_t r, int64_t span) {
  return kUnit ? r : r / span;
}

// Unit k of block `block` in outer row o of the tensor at address `base`.
template <typename U>
__device__ __forceinline__ U* unit_at(int64_t base, int64_t block, int64_t o, int64_t k, int64_t row, int64_t span) {
  return reinterpret_cast<U*>(base) + o * row + block * span + k;
}

template <typename U, bool kUnit>
__global__ void gather_kernel(const int64_t* bases, const int64_t* src_layer, const int64_t* src_block, U* out,
                              int64_t outer, int64_t row, int64_t span) {
  for_each_position(outer, row, [&](int64_t o, int64_t r) {
    const int64_t b = block_of<kUnit>(r, span);
    out[o * row + r] = *unit_at<const U>(bases[src_layer[b]], src_block[b], o, r - b * span, row, span);
  });
}

template <typename T, bool kUnit>
__global__ void scatter_add_kernel(const int64_t* bases, const int64_t* src_layer, const int64_t* src_block,
                                   const T* values, int64_t outer, int64_t row, int64_t span) {
  for_each_position(outer, row, [&](int64_t o, int64_t r) {
    const int64_t b = block_of<kUnit>(r, span);
    T* target = unit_at<T>(bases[src_layer[b]], src_block[b], o, r - b * span, row, span);
    *target = from_f<T>(to_f(*target) + to_f(values[o * row + r]));
  });
}

// A row's positions are the pairs' blocks one after the other: pair m at [m * span, (m + 1) * span).
template <typename U, bool kUnit>
__global__ void swap_kernel(const int64_t* bases, const int64_t* pairs, int64_t n_pairs, int64_t outer, int64_t row,
                            int64_t span) {
  for_each_position(outer, n_pairs * span, [&](int64_t o, int64_t r) {
    const int64_t m = block_of<kUnit>(r, span), k = r - m * span;
    const int64_t* pair = pairs + 4 * m;
    U* a = unit_at<U>(bases[pair[0]], pair[1], o, k, row, span);
    U* b = unit_at<U>(bases[pair[2]], pair[3], o, k, row, span);
    const U x = *a;
    *a = *b;
    *b = x;
  });
}

// ---- host helpers ----

struct Layout {
  int64_t outer, row, span;  // in elements; divided by the unit when moving bits
};

Layout layout_of(const at::Tensor& t, int64_t dim, int64_t block_size) {
  check_permute_blocks(t, dim, block_size);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim) * inner, block_size * inner};
}

const int64_t* index_data(const at::Tensor& index, const at::Tensor& like, int64_t numel, const char* what) {
  check_permute_index(index, like, numel, what);
  return index.const_data_ptr<int64_t>();
}

// The tensors' addresses in a device table (from pageable memory: staged before the call returns).
at::Tensor address_table(const std::vector<at::Tensor>& tensors, cudaStream_t stream) {
  std::vector<int64_t> host;
  for (const auto& t : tensors) host.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  auto table = at::empty({static_cast<int64_t>(host.size())}, tensors[0].options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemcpyAsync(table.data_ptr(), host.data(), host.size() * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream));
  return table;
}

// The widest unit (bytes, at least an element) that divides a span and to which every tensor is aligned.
int unit_bytes(const std::vector<at::Tensor>& tensors, int64_t span_bytes) {
  const int element = static_cast<int>(tensors[0].element_size());
  int unit = 16;
  for (const auto& t : tensors)
    while (unit > element && (span_bytes % unit || reinterpret_cast<uintptr_t>(t.data_ptr()) % unit)) unit /= 2;
  return unit;
}

// Calls f(U{}) for the unsigned type U of `bytes` bytes.
template <typename F> void dispatch_unit(int bytes, F&& f) {
  switch (bytes) {
    case 16: return f(uint4{});
    case 8: return f(uint2{});
    case 4: return f(uint32_t{});
    default: return f(uint16_t{});
  }
}

// Launches kernel<..., true> (one-unit spans: no division) or kernel<..., false>, over outer rows x width.
template <typename Launch> void launch_grid(int64_t outer, int64_t width, int64_t span, Launch&& launch) {
  if (outer == 0 || width == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((width + kThreads - 1) / kThreads, int64_t{1} << 20)),
                  static_cast<unsigned>(std::min(outer, kMaxGridY)));
  launch(grid, span == 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor gather_blocks_cuda(const std::vector<at::Tensor>& tensors, int64_t layer, const at::Tensor& src_layer,
                              const at::Tensor& src_block, int64_t dim, int64_t block_size) {
  check_permute_stack(tensors, "tensors", c10::DeviceType::CUDA);
  check_permute_layer(layer, tensors.size(), "gather_blocks");
  const Layout lay = layout_of(tensors[0], dim, block_size);
  const int64_t n_blocks = tensors[0].size(dim) / block_size;
  const int64_t* layers = index_data(src_layer, tensors[0], n_blocks, "src_layer");
  const int64_t* blocks = index_data(src_block, tensors[0], n_blocks, "src_block");
  c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty_like(tensors[layer]);
  const int64_t element = out.element_size();
  std::vector<at::Tensor> touched(tensors);
  touched.push_back(out);
  const int unit = unit_bytes(touched, lay.span * element);
  const int64_t per_unit = unit / element, span = lay.span / per_unit, row = lay.row / per_unit;
  const auto bases = address_table(tensors, stream);
  dispatch_unit(unit, [&](auto tag) {
    using U = decltype(tag);
    launch_grid(lay.outer, row, span, [&](dim3 grid, bool unit_span) {
      auto kernel = unit_span ? gather_kernel<U, true> : gather_kernel<U, false>;
      kernel<<<grid, kThreads, 0, stream>>>(bases.const_data_ptr<int64_t>(), layers, blocks,
                                            reinterpret_cast<U*>(out.data_ptr()), lay.outer, row, span);
    });
  });
  return out;
}

void scatter_add_blocks_cuda(const std::vector<at::Tensor>& targets, int64_t layer, const at::Tensor& values,
                             const at::Tensor& src_layer, const at::Tensor& src_block, int64_t dim,
                             int64_t block_size) {
  check_permute_stack(targets, "targets", c10::DeviceType::CUDA);
  check_permute_stack({targets[0], values}, "targets and values", c10::DeviceType::CUDA);
  check_permute_layer(layer, targets.size(), "scatter_add_blocks");
  const Layout lay = layout_of(values, dim, block_size);
  const int64_t n_blocks = values.size(dim) / block_size;
  const int64_t* layers = index_data(src_layer, values, n_blocks, "src_layer");
  const int64_t* blocks = index_data(src_block, values, n_blocks, "src_block");
  c10::cuda::CUDAGuard guard(values.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto bases = address_table(targets, stream);
  dispatch_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_grid(lay.outer, lay.row, lay.span, [&](dim3 grid, bool unit_span) {
      auto kernel = unit_span ? scatter_add_kernel<T, true> : scatter_add_kernel<T, false>;
      kernel<<<grid, kThreads, 0, stream>>>(bases.const_data_ptr<int64_t>(), layers, blocks,
                                            reinterpret_cast<const T*>(values.const_data_ptr()), lay.outer, lay.row,
                                            lay.span);
    });
  });
}

void swap_blocks_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& pairs, int64_t dim,
                      int64_t block_size) {
  check_permute_stack(tensors, "tensors", c10::DeviceType::CUDA);
  check_swap_pairs(pairs);
  const Layout lay = layout_of(tensors[0], dim, block_size);
  const int64_t n_pairs = pairs.size(0);
  const int64_t* rows = index_data(pairs, tensors[0], 4 * n_pairs, "pairs");
  c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t element = tensors[0].element_size();
  const int unit = unit_bytes(tensors, lay.span * element);
  const int64_t per_unit = unit / element, span = lay.span / per_unit, row = lay.row / per_unit;
  const auto bases = address_table(tensors, stream);
  dispatch_unit(unit, [&](auto tag) {
    using U = decltype(tag);
    launch_grid(lay.outer, n_pairs * span, span, [&](dim3 grid, bool unit_span) {
      auto kernel = unit_span ? swap_kernel<U, true> : swap_kernel<U, false>;
      kernel<<<grid, kThreads, 0, stream>>>(bases.const_data_ptr<int64_t>(), rows, n_pairs, lay.outer, row, span);
    });
  });
}

}  // namespace merge_engine
