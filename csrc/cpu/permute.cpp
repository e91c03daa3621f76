// CPU kernels of the permute family (merge_engine/ops/permute.py): moving blocks of parameters between
// the per-layer tensors of one kind (gather through index tables, its adjoint scatter-add, and
// disjoint in-place swaps).
//
// A tensor is seen as [outer, extent, inner] around the block dimension: along extent, block b of
// outer row o is one contiguous span of block_size * inner elements (rows of a matrix: outer = 1, one
// span per block; columns: one short span per row). Blocks that follow one another on both sides of
// a move merge into runs (under a key, most of a layer's blocks stay in place: a few long runs), and
// the work items, split over threads, are (outer row, run) pairs: one memcpy each, or a plain element
// copy for one-element runs, where a call would cost more than the copy. gather and swap move bits,
// so they need only the element width; scatter-add adds in fp32 and rounds once to the dtype, as
// torch does (see the Python docstring). The Python layer validates every index; the range checks
// here only guard memory.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../permute.h"
#include "dtypes.h"
#include "memory.h"

namespace merge_engine {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // elements moved per task at least: thread start-up is amortised
constexpr int64_t kAhead = 256;              // items between a prefetch and its use (see parallel_runs)

struct Layout {
  int64_t outer, n_blocks, span;  // span: elements of one block in one outer row
  int64_t row() const { return n_blocks * span; }
};

Layout layout_of(const torch::Tensor& t, int64_t dim, int64_t block_size) {
  check_permute_blocks(t, dim, block_size);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim) / block_size, block_size * inner};
}

const int64_t* index_data(const torch::Tensor& index, const torch::Tensor& like, int64_t numel, const char* what) {
  check_permute_index(index, like, numel, what);
  return index.data_ptr<int64_t>();
}

// Block `block` of row 0 of tensors[layer], as elements of T.
template <typename T>
T* block_start(const std::vector<torch::Tensor>& tensors, int64_t layer, int64_t block, const Layout& lay) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(tensors.size()) && block >= 0 && block < lay.n_blocks,
              "merge_engine CPU kernel: block (", layer, ", ", block, ") is out of range");
  return static_cast<T*>(tensors[layer].data_ptr()) + block * lay.span;
}

// Blocks that follow one another on both sides of a move (a key leaves most blocks in place), as one run
// of `length` elements at a and b in row 0; row o's run lies o * row further on both sides.
template <typename T> struct Run {
  T* a;
  T* b;
  int64_t length;
};

template <typename T> void append(std::vector<Run<T>>& runs, T* a, T* b, int64_t length) {
  if (!runs.empty() && runs.back().a + runs.back().length == a && runs.back().b + runs.back().length == b)
    runs.back().length += length;
  else
    runs.push_back({a, b, length});
}

// The (outer row, run) item i of the row-major grid, stepped without division.
struct Cursor {
  int64_t o, j, n_runs;
  Cursor(int64_t i, int64_t n) : o(i / n), j(i % n), n_runs(n) {}
  void next() {
    if (++j == n_runs) j = 0, ++o;
  }
};

// Calls f(a, b, length) for every run in every outer row, in parallel; items are (row, run) pairs.
// Runs of columns land on random cache lines of other rows (of other layers), so each item first
// prefetches the item kAhead further on: without it, the loop waits on one cache miss at a time.
template <typename T, typename F>
void parallel_runs(const std::vector<Run<T>>& runs, int64_t outer, int64_t row, F&& f) {
  const int64_t n_runs = static_cast<int64_t>(runs.size());
  if (outer == 0 || n_runs == 0) return;
  int64_t elements = 0;
  for (const auto& r : runs) elements += r.length;
  const int64_t grain = std::max<int64_t>(1, kGrainElements * n_runs / std::max<int64_t>(1, elements));
  at::parallel_for(0, outer * n_runs, grain, [&](int64_t lo, int64_t hi) {
    Cursor item(lo, n_runs), ahead(lo + kAhead, n_runs);
    for (int64_t i = lo; i < hi; ++i, item.next(), ahead.next()) {
      if (ahead.o < outer) {
        __builtin_prefetch(runs[ahead.j].a + ahead.o * row, 1);
        __builtin_prefetch(runs[ahead.j].b + ahead.o * row, 0);
      }
      f(runs[item.j].a + item.o * row, runs[item.j].b + item.o * row, runs[item.j].length);
    }
  });
}

// Calls f(W{}) with W an unsigned integer of the tensor's element width (the kernel dtypes only).
template <typename F> void dispatch_width(const torch::Tensor& t, F&& f) {
  dispatch_dtype(t.scalar_type(), [&](auto tag) {
    if constexpr (sizeof(tag) == 2) f(uint16_t{});
    else f(uint32_t{});
  });
}

template <typename W>
void gather_typed(const std::vector<torch::Tensor>& tensors, const int64_t* src_layer, const int64_t* src_block,
                  const Layout& lay, W* out) {
  std::vector<Run<W>> runs;
  for (int64_t b = 0; b < lay.n_blocks; ++b)
    append(runs, out + b * lay.span, block_start<W>(tensors, src_layer[b], src_block[b], lay), lay.span);
  parallel_runs(runs, lay.outer, lay.row(), [](W* dst, const W* src, int64_t length) {
    if (length == 1)  // a call would cost more than the copy
      *dst = *src;
    else
      std::memcpy(dst, src, length * sizeof(W));
  });
}

template <typename T>
void scatter_add_typed(const std::vector<torch::Tensor>& targets, T* values, const int64_t* src_layer,
                       const int64_t* src_block, const Layout& lay) {
  std::vector<Run<T>> runs;
  for (int64_t b = 0; b < lay.n_blocks; ++b)
    append(runs, block_start<T>(targets, src_layer[b], src_block[b], lay), values + b * lay.span, lay.span);
  // Distinct (layer, block) pairs: no two items write one element.
  parallel_runs(runs, lay.outer, lay.row(), [](T* dst, const T* src, int64_t length) {
    for (int64_t k = 0; k < length; ++k) dst[k] = round_to<T>(to_f(dst[k]) + to_f(src[k]));
  });
}

template <typename W>
void swap_typed(const std::vector<torch::Tensor>& tensors, const int64_t* pairs, int64_t n_pairs, const Layout& lay) {
  std::vector<Run<W>> runs;
  for (int64_t m = 0; m < n_pairs; ++m)
    append(runs, block_start<W>(tensors, pairs[4 * m], pairs[4 * m + 1], lay),
           block_start<W>(tensors, pairs[4 * m + 2], pairs[4 * m + 3], lay), lay.span);
  parallel_runs(runs, lay.outer, lay.row(), [](W* a, W* b, int64_t length) {
    if (length == 1)
      std::swap(*a, *b);
    else
      std::swap_ranges(a, a + length, b);
  });
}

}  // namespace

torch::Tensor gather_blocks_cpu(const std::vector<torch::Tensor>& tensors, int64_t layer,
                                const torch::Tensor& src_layer, const torch::Tensor& src_block, int64_t dim,
                                int64_t block_size) {
  check_permute_stack(tensors, "tensors", c10::DeviceType::CPU);
  check_permute_layer(layer, tensors.size(), "gather_blocks");
  const Layout lay = layout_of(tensors[0], dim, block_size);
  const int64_t* layers = index_data(src_layer, tensors[0], lay.n_blocks, "src_layer");
  const int64_t* blocks = index_data(src_block, tensors[0], lay.n_blocks, "src_block");
  auto out = empty_output_like(tensors[layer]);
  dispatch_width(out, [&](auto w) {
    using W = decltype(w);
    gather_typed<W>(tensors, layers, blocks, lay, static_cast<W*>(out.data_ptr()));
  });
  return out;
}

void scatter_add_blocks_cpu(const std::vector<torch::Tensor>& targets, int64_t layer, const torch::Tensor& values,
                            const torch::Tensor& src_layer, const torch::Tensor& src_block, int64_t dim,
                            int64_t block_size) {
  check_permute_stack(targets, "targets", c10::DeviceType::CPU);
  check_permute_stack({targets[0], values}, "targets and values", c10::DeviceType::CPU);
  check_permute_layer(layer, targets.size(), "scatter_add_blocks");
  const Layout lay = layout_of(values, dim, block_size);
  const int64_t* layers = index_data(src_layer, values, lay.n_blocks, "src_layer");
  const int64_t* blocks = index_data(src_block, values, lay.n_blocks, "src_block");
  dispatch_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    scatter_add_typed<T>(targets, values.data_ptr<T>(), layers, blocks, lay);
  });
}

void swap_blocks_cpu(const std::vector<torch::Tensor>& tensors, const torch::Tensor& pairs, int64_t dim,
                     int64_t block_size) {
  check_permute_stack(tensors, "tensors", c10::DeviceType::CPU);
  const Layout lay = layout_of(tensors[0], dim, block_size);
  check_swap_pairs(pairs);
  const int64_t n_pairs = pairs.size(0);
  const int64_t* rows = index_data(pairs, tensors[0], 4 * n_pairs, "pairs");
  dispatch_width(tensors[0], [&](auto w) {
    using W = decltype(w);
    swap_typed<W>(tensors, rows, n_pairs, lay);
  });
}

}  // namespace merge_engine
