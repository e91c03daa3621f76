// Python bindings of the CUDA kernels (module merge_engine_cuda, built by merge_engine/ops/backends.py).
// Same functions, signatures and semantics as csrc/cpu/bindings.cpp, for CUDA tensors; delta_cutoffs
// returns its int64 [len(counts), 2] cut-offs as a CPU tensor (they are found on the host).
#include <torch/extension.h>

namespace merge_engine {
at::Tensor delta_cutoffs_cuda(const at::Tensor& base, const at::Tensor& expert, const std::vector<int64_t>& counts,
                              bool largest);
at::Tensor merge_task_vectors_cuda(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                                   const std::vector<double>& weights, int64_t mode,
                                   const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                   const std::vector<double>& densities, const std::vector<double>& epsilons,
                                   bool consensus, bool normalize, bool rescale, double lambda, int64_t key0,
                                   int64_t key1);
}  // namespace merge_engine

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "merge_engine CUDA kernels";
  m.attr("max_experts") = 16;  // kMaxExperts in task_vectors.cu: larger groups go to the reference
  m.def("delta_cutoffs", &merge_engine::delta_cutoffs_cuda,
        "Cut-offs (key, index) of the first counts[j] elements of the stable order of |expert - base|");
  m.def("merge_task_vectors", &merge_engine::merge_task_vectors_cuda,
        "Fused sparsify + weight + (sign election, disjoint mean) + lambda + base, one pass");
}
