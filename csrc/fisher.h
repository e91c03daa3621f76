// Argument checks of the Fisher family, shared by the CPU (csrc/cpu/fisher.cpp) and CUDA
// (csrc/cuda/fisher.cu) entry points: contiguous tensors of one shape on one device of the given type;
// for fisher_merge, one Fisher, coefficient and floor per param, params of one dtype and Fishers of
// one dtype. (Each dtype is checked by the backend's dtype dispatch.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <vector>

namespace merge_engine {

// Contiguous tensors of the shape of `like`, on its device, which is of the given type.
inline void check_fisher_tensors(const std::vector<at::Tensor>& tensors, const at::Tensor& like, const char* what,
                                 c10::DeviceType device) {
  const auto where = c10::DeviceTypeName(device);
  for (const auto& x : tensors) {
    TORCH_CHECK(x.device().type() == device && x.device() == like.device() && x.is_contiguous(), "merge_engine ",
                where, " kernel: ", what, " must be contiguous ", where, " tensors on one device");
    TORCH_CHECK(x.sizes() == like.sizes(), "merge_engine ", where, " kernel: ", what, " must have one shape, got ",
                x.sizes(), " and ", like.sizes());
  }
}

inline void check_accumulate_fisher_args(const at::Tensor& fisher, const at::Tensor& grad, c10::DeviceType device) {
  check_fisher_tensors({fisher, grad}, fisher, "fisher and grad", device);
}

inline void check_fisher_merge_args(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& fishers,
                                    const std::vector<double>& coefficients, const std::vector<double>& floors,
                                    c10::DeviceType device) {
  const size_t K = params.size();
  TORCH_CHECK(K > 0 && fishers.size() == K && coefficients.size() == K && floors.size() == K,
              "fisher_merge: one Fisher, coefficient and floor per param, and at least one param");
  check_fisher_tensors(params, params[0], "params and Fishers", device);
  check_fisher_tensors(fishers, params[0], "params and Fishers", device);
  for (size_t j = 0; j < K; ++j)
    TORCH_CHECK(params[j].scalar_type() == params[0].scalar_type() &&
                    fishers[j].scalar_type() == fishers[0].scalar_type(),
                "fisher_merge: params must share one dtype and Fishers another");
}

}  // namespace merge_engine
