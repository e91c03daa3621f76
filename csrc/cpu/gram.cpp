// CPU kernel of the Gram family (merge_engine/ops/gram.py): gram += X^T X over the kept rows of the
// activations X [T, d], upper triangle only.
//
// The products run in BLAS (at::addmm_, sgemm), on chunks of kChunk kept rows converted to fp32
// (bf16 and fp16 convert exactly, and their products are exact in fp32). The diagonal is cut into
// leaves of kLeaf columns; the blocks above them are covered recursively, the corner between two
// halves of the leaves in one sgemm straight into gram, then each half. The leaves' own products go
// to scratch in one batched call, and only their upper halves are added, so the strictly lower
// triangle is never written (not even += 0, which would turn a -0 into +0). Few, large BLAS calls:
// each is a parallel region, and on a loaded machine every region waits for its slowest thread.
// Any summation order meets the bound stated in ops/gram.py.
#include <torch/extension.h>

#include <algorithm>
#include <optional>

#include "../gram.h"

namespace merge_engine {
namespace {

constexpr int64_t kChunk = 4096;  // rows per fp32 chunk: bounds the scratch copy, keeps sgemm's K long
constexpr int64_t kLeaf = 128;    // diagonal blocks computed whole (scratch products): d kLeaf / 2 extra work

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// gram[i0 + r, i0 + c] += product[r, c] for c >= r: the upper triangle of a diagonal block.
void add_upper_of(torch::Tensor& gram, const torch::Tensor& product, int64_t i0) {
  const int64_t n = product.size(0), d = gram.size(0);
  const float* p = product.const_data_ptr<float>();
  float* g = gram.data_ptr<float>() + i0 * d + i0;
  for (int64_t r = 0; r < n; ++r)  // serial: d kLeaf / 2 adds a chunk, far below one sgemm
    for (int64_t c = r; c < n; ++c) g[r * d + c] += p[r * n + c];
}

// The diagonal leaves (kLeaf columns each, the last one possibly narrower): their products in one
// batched call (and one more for a narrower last leaf), of which the upper triangles are added.
void add_leaves(torch::Tensor& gram, const torch::Tensor& xc) {
  const int64_t d = gram.size(0), full = d / kLeaf;
  if (full > 0) {
    const auto xs = xc.narrow(1, 0, full * kLeaf).view({xc.size(0), full, kLeaf});
    const auto products = at::bmm(xs.permute({1, 2, 0}), xs.permute({1, 0, 2})).contiguous();
    for (int64_t b = 0; b < full; ++b) add_upper_of(gram, products[b], b * kLeaf);
  }
  if (d > full * kLeaf) {
    const auto last = xc.narrow(1, full * kLeaf, d - full * kLeaf);
    add_upper_of(gram, at::mm(last.t(), last), full * kLeaf);
  }
}

// The blocks above the diagonal leaves l0 .. l1 - 1: the corner between their two halves in one sgemm
// into gram's strided view, then the same within each half.
void add_corners(torch::Tensor& gram, const torch::Tensor& xc, int64_t l0, int64_t l1) {
  if (l1 - l0 < 2) return;
  const int64_t mid = (l0 + l1) / 2, a0 = l0 * kLeaf, a1 = mid * kLeaf, b1 = std::min(l1 * kLeaf, gram.size(0));
  auto corner = gram.narrow(0, a0, a1 - a0).narrow(1, a1, b1 - a1);
  corner.addmm_(xc.narrow(1, a0, a1 - a0).t(), xc.narrow(1, a1, b1 - a1));
  add_corners(gram, xc, l0, mid);
  add_corners(gram, xc, mid, l1);
}

}  // namespace

void accumulate_gram_cpu(torch::Tensor& gram, const torch::Tensor& x, const std::optional<torch::Tensor>& mask) {
  check_gram_args(gram, x, mask, c10::DeviceType::CPU);
  if (gram.numel() == 0) return;
  // Kept row indices (masked-out rows are never read), or none to take every row in place.
  const std::optional<torch::Tensor> kept = mask ? std::optional<torch::Tensor>(mask->nonzero().flatten())
                                                 : std::nullopt;
  const int64_t rows = kept ? kept->numel() : x.size(0);
  for (int64_t t0 = 0; t0 < rows; t0 += kChunk) {
    const int64_t n = std::min(kChunk, rows - t0);
    const auto chunk = kept ? x.index_select(0, kept->narrow(0, t0, n)) : x.narrow(0, t0, n);
    const auto xc = chunk.to(at::kFloat);  // exact; no copy for fp32 rows taken in place
    add_corners(gram, xc, 0, ceil_div(gram.size(0), kLeaf));
    add_leaves(gram, xc);
  }
}

}  // namespace merge_engine
