// CPU kernel of the Gram family (merge_engine/ops/gram.py): gram += X^T X over the kept rows of the
// activations X [T, d], upper triangle only.
//
// The products run in BLAS (at::addmm_, sgemm), on chunks of kChunk kept rows converted to fp32
// (bf16 and fp16 convert exactly, and their products are exact in fp32). The upper triangle is split
// recursively: the off-diagonal quarter adds straight into gram, the diagonal quarters split again;
// small diagonal blocks go through a scratch product whose upper half alone is added, so the strictly
// lower triangle is never written (not even += 0, which would turn a -0 into +0). Any summation
// order meets the bound stated in ops/gram.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>

namespace merge_engine {
namespace {

constexpr int64_t kChunk = 4096;  // rows per fp32 chunk: bounds the scratch copy, keeps sgemm's K long
constexpr int64_t kLeaf = 128;    // diagonal blocks up to this size are computed whole (a scratch product)

void check_args(const torch::Tensor& gram, const torch::Tensor& x, const std::optional<torch::Tensor>& mask) {
  TORCH_CHECK(gram.device().is_cpu() && gram.scalar_type() == at::kFloat && gram.is_contiguous() && gram.dim() == 2 &&
                  gram.size(0) == gram.size(1),
              "accumulate_gram: gram must be a contiguous float32 [d, d] CPU tensor, got ", gram.scalar_type(), " ",
              gram.sizes(), " on ", gram.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              "accumulate_gram: activations must be a contiguous float32, bfloat16 or float16 [T, d] tensor, got ",
              dt, " ", x.sizes());
  TORCH_CHECK(x.device() == gram.device(), "accumulate_gram: gram is on ", gram.device(), " but the activations on ",
              x.device());
  TORCH_CHECK(x.size(1) == gram.size(0), "accumulate_gram: gram ", gram.sizes(), " does not match activations ",
              x.sizes());
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == x.size(0) &&
                    mask->device() == x.device(),
                "accumulate_gram: mask must be a bool [T] tensor on ", x.device(), " for activations ", x.sizes(),
                ", got ", mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
  }
}

// gram[i0:i0+n, i0:i0+n] += the upper triangle of xi^T xi, through a scratch product; the strictly
// lower triangle stays untouched.
void add_leaf(torch::Tensor& gram, const torch::Tensor& xi, int64_t i0) {
  const auto product = at::mm(xi.t(), xi);
  const int64_t n = product.size(0), d = gram.size(0);
  const float* p = product.const_data_ptr<float>();
  float* g = gram.data_ptr<float>() + i0 * d + i0;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = r; c < n; ++c) g[r * d + c] += p[r * n + c];
  });
}

// The upper triangle of gram[i0:i0+n, i0:i0+n] += xc[:, i0:i0+n]^T xc[:, i0:i0+n], for an fp32 chunk
// xc [rows, d]: the off-diagonal quarter in one sgemm into gram's strided view, the two diagonal
// quarters recursively, down to leaves of at most kLeaf columns (the only work done twice).
void add_upper(torch::Tensor& gram, const torch::Tensor& xc, int64_t i0, int64_t n) {
  if (n <= kLeaf) return add_leaf(gram, xc.narrow(1, i0, n), i0);
  const int64_t h = n / 2;
  auto corner = gram.narrow(0, i0, h).narrow(1, i0 + h, n - h);
  corner.addmm_(xc.narrow(1, i0, h).t(), xc.narrow(1, i0 + h, n - h));
  add_upper(gram, xc, i0, h);
  add_upper(gram, xc, i0 + h, n - h);
}

}  // namespace

void accumulate_gram_cpu(torch::Tensor& gram, const torch::Tensor& x, const std::optional<torch::Tensor>& mask) {
  check_args(gram, x, mask);
  if (gram.numel() == 0) return;
  // Kept row indices (masked-out rows are never read), or none to take every row in place.
  const std::optional<torch::Tensor> kept = mask ? std::optional<torch::Tensor>(mask->nonzero().flatten())
                                                 : std::nullopt;
  const int64_t rows = kept ? kept->numel() : x.size(0);
  for (int64_t t0 = 0; t0 < rows; t0 += kChunk) {
    const int64_t n = std::min(kChunk, rows - t0);
    const auto chunk = kept ? x.index_select(0, kept->narrow(0, t0, n)) : x.narrow(0, t0, n);
    add_upper(gram, chunk.to(at::kFloat), 0, gram.size(0));  // exact; no copy for fp32 rows taken in place
  }
}

}  // namespace merge_engine
