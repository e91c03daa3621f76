// Argument checks of accumulate_gram, shared by the CPU (csrc/cpu/gram.cpp) and CUDA (csrc/cuda/gram.cu)
// bindings: gram a contiguous fp32 [d, d] tensor, activations a contiguous fp32/bf16/fp16 [T, d] tensor,
// mask a contiguous bool [T] tensor or none, all on one device of the given type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <optional>

namespace merge_engine {

inline void check_gram_args(const at::Tensor& gram, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                            c10::DeviceType device) {
  const auto where = c10::DeviceTypeName(device);
  TORCH_CHECK(gram.device().type() == device && gram.scalar_type() == at::kFloat && gram.is_contiguous() &&
                  gram.dim() == 2 && gram.size(0) == gram.size(1),
              "accumulate_gram: gram must be a contiguous float32 [d, d] ", where, " tensor, got ", gram.scalar_type(),
              " ", gram.sizes(), " on ", gram.device());
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
                    mask->device() == x.device() && mask->is_contiguous(),
                "accumulate_gram: mask must be a contiguous bool [T] tensor on ", x.device(), " for activations ",
                x.sizes(), ", got ", mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
  }
}

}  // namespace merge_engine
