// Python bindings of the CUDA kernels (module merge_engine._cuda_kernels, built by setup.py).
// Same functions, signatures and semantics as csrc/cpu/bindings.cpp, for CUDA tensors; delta_cutoffs
// returns its int64 [len(counts), 2] cut-offs as a CPU tensor (they are found on the host).
#include <torch/extension.h>

#include <optional>

namespace merge_engine {
at::Tensor delta_cutoffs_cuda(const at::Tensor& base, const at::Tensor& expert, const std::vector<int64_t>& counts,
                              bool largest);
at::Tensor merge_task_vectors_cuda(const at::Tensor& base, const std::vector<at::Tensor>& experts,
                                   const std::vector<double>& weights, int64_t mode,
                                   const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                   const std::vector<double>& densities, const std::vector<double>& epsilons,
                                   bool consensus, bool normalize, bool rescale, double lambda, int64_t key0,
                                   int64_t key1);
void accumulate_fisher_cuda(const at::Tensor& fisher, const at::Tensor& grad, double scale);
at::Tensor fisher_merge_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& fishers,
                             const std::vector<double>& coefficients, const std::vector<double>& floors);
void accumulate_gram_cuda(const at::Tensor& gram, const at::Tensor& x, const std::optional<at::Tensor>& mask);
at::Tensor gather_blocks_cuda(const std::vector<at::Tensor>& tensors, int64_t layer, const at::Tensor& src_layer,
                              const at::Tensor& src_block, int64_t dim, int64_t block_size);
void scatter_add_blocks_cuda(const std::vector<at::Tensor>& targets, int64_t layer, const at::Tensor& values,
                             const at::Tensor& src_layer, const at::Tensor& src_block, int64_t dim,
                             int64_t block_size);
void swap_blocks_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& pairs, int64_t dim,
                      int64_t block_size);
}  // namespace merge_engine

#define MERGE_ENGINE_STR2(x) #x
#define MERGE_ENGINE_STR(x) MERGE_ENGINE_STR2(x)

// The kernels run without the GIL, as torch's own ops do: other Python threads (a merge's read and write threads,
// another merge, the caller's) run while they launch and while they wait for the GPU. They touch no Python object.
static const auto kReleaseGil = py::call_guard<py::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("build_key") = MERGE_ENGINE_STR(MERGE_ENGINE_BUILD_KEY);  // which sources and flags it was built from (kernel_build.py)
  m.doc() = "merge_engine CUDA kernels";
  // kMaxExperts in task_vectors.cu: larger merge_task_vectors groups go to the reference (fisher_merge
  // takes any number of models).
  m.attr("max_experts") = 16;
  m.def("delta_cutoffs", &merge_engine::delta_cutoffs_cuda, kReleaseGil,
        "Cut-offs (key, index) of the first counts[j] elements of the stable order of |expert - base|");
  m.def("merge_task_vectors", &merge_engine::merge_task_vectors_cuda, kReleaseGil,
        "Fused sparsify + weight + (sign election, disjoint mean) + lambda + base, one pass");
  m.def("accumulate_fisher", &merge_engine::accumulate_fisher_cuda, kReleaseGil, "In place: fisher += scale * grad^2 (fp32 math)");
  m.def("fisher_merge", &merge_engine::fisher_merge_cuda, kReleaseGil,
        "Fisher-weighted average sum_j c_j max(F_j, floor_j) theta_j / sum_j c_j max(F_j, floor_j), one pass");
  m.def("accumulate_gram", &merge_engine::accumulate_gram_cuda, kReleaseGil,
        "In place: the upper triangle of gram += x^T x over the rows where mask is True (fp32 sums)",
        py::arg("gram"), py::arg("x"), py::arg("mask") = py::none());
  m.def("gather_blocks", &merge_engine::gather_blocks_cuda, kReleaseGil,
        "A layer's tensor whose block b is block src_block[b] of tensors[src_layer[b]]");
  m.def("scatter_add_blocks", &merge_engine::scatter_add_blocks_cuda, kReleaseGil,
        "In place: block src_block[b] of targets[src_layer[b]] += block b of values (the adjoint of gather_blocks)");
  m.def("swap_blocks", &merge_engine::swap_blocks_cuda, kReleaseGil,
        "In place: swaps the blocks (layer_a, block_a) and (layer_b, block_b) of each row of pairs");
}
