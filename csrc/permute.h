// Argument checks of the permute family, shared by the CPU (csrc/cpu/permute.cpp) and CUDA
// (csrc/cuda/permute.cu) entry points: the stacks of per-layer tensors, the index tables, the layer,
// the block dimension and size, and swap_blocks' pairs. The Python layer validates every index
// (ops/permute.py); the backends' range checks only guard memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace merge_engine {

// At least one tensor, all contiguous, of one shape and one kernel dtype (float32, bfloat16, float16), on
// one device of the given type.
inline void check_permute_stack(const std::vector<at::Tensor>& tensors, const char* what, c10::DeviceType device) {
  const auto where = c10::DeviceTypeName(device);
  TORCH_CHECK(!tensors.empty(), "merge_engine ", where, " kernel: no ", what);
  for (const auto& t : tensors)
    TORCH_CHECK(t.device().type() == device && t.device() == tensors[0].device() && t.is_contiguous() &&
                    t.sizes() == tensors[0].sizes() && t.scalar_type() == tensors[0].scalar_type(),
                "merge_engine ", where, " kernel: ", what,
                " must be contiguous ", where, " tensors of one shape and dtype on one device");
  const auto dt = tensors[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "merge_engine ", where,
              " kernel: dtype must be float32, bfloat16 or float16, got ", dt);
}

// A contiguous int64 index table of numel entries on the device of `like`.
inline void check_permute_index(const at::Tensor& index, const at::Tensor& like, int64_t numel, const char* what) {
  TORCH_CHECK(index.device() == like.device() && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.numel() == numel,
              "merge_engine ", c10::DeviceTypeName(like.device().type()), " kernel: ", what,
              " must be a contiguous int64 tensor of ", numel, " entries on the data's device");
}

// Blocks of block_size along dimension dim of t.
inline void check_permute_blocks(const at::Tensor& t, int64_t dim, int64_t block_size) {
  TORCH_CHECK(dim >= 0 && dim < t.dim() && block_size > 0 && t.size(dim) % block_size == 0, "merge_engine ",
              c10::DeviceTypeName(t.device().type()), " kernel: bad dim or block_size");
}

// The layer a gather writes or a scatter-add reads, among n_layers.
inline void check_permute_layer(int64_t layer, size_t n_layers, const char* op) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(n_layers), op, ": layer out of range");
}

inline void check_swap_pairs(const at::Tensor& pairs) {
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 4, "swap_blocks: pairs must be [M, 4]");
}

}  // namespace merge_engine
