// Python bindings of the CPU kernels (module merge_engine._cpu_kernels, built by setup.py; recipe in
// merge_engine/kernel_build.py).
#include <torch/extension.h>

#include <optional>

#include "memory.h"

namespace merge_engine {
torch::Tensor delta_cutoffs_cpu(const torch::Tensor& base, const torch::Tensor& expert,
                                const std::vector<int64_t>& counts, bool largest);
torch::Tensor merge_task_vectors_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& experts,
                                     const std::vector<double>& weights, int64_t mode,
                                     const std::vector<int64_t>& counts_lo, const std::vector<int64_t>& counts_hi,
                                     const std::vector<double>& densities, const std::vector<double>& epsilons,
                                     bool consensus, bool normalize, bool rescale, double lambda,
                                     int64_t key0, int64_t key1, const std::optional<torch::Tensor>& out);
torch::Tensor philox_uniforms_cpu(int64_t start, int64_t numel, int64_t stream, int64_t key0, int64_t key1);
void accumulate_fisher_cpu(torch::Tensor& fisher, const torch::Tensor& grad, double scale);
torch::Tensor fisher_merge_cpu(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& fishers,
                               const std::vector<double>& coefficients, const std::vector<double>& floors,
                               const std::optional<torch::Tensor>& out);
void accumulate_gram_cpu(torch::Tensor& gram, const torch::Tensor& x, const std::optional<torch::Tensor>& mask);
torch::Tensor gather_blocks_cpu(const std::vector<torch::Tensor>& tensors, int64_t layer,
                                const torch::Tensor& src_layer, const torch::Tensor& src_block, int64_t dim,
                                int64_t block_size);
void scatter_add_blocks_cpu(const std::vector<torch::Tensor>& targets, int64_t layer, const torch::Tensor& values,
                            const torch::Tensor& src_layer, const torch::Tensor& src_block, int64_t dim,
                            int64_t block_size);
void swap_blocks_cpu(const std::vector<torch::Tensor>& tensors, const torch::Tensor& pairs, int64_t dim,
                     int64_t block_size);
}  // namespace merge_engine

#define MERGE_ENGINE_STR2(x) #x
#define MERGE_ENGINE_STR(x) MERGE_ENGINE_STR2(x)

// The kernels run without the GIL, as torch's own ops do: other Python threads (a merge's read and write threads,
// another merge, the caller's) run while they compute. They touch no Python object.
static const auto kReleaseGil = py::call_guard<py::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "merge_engine CPU kernels";
  m.attr("build_key") = MERGE_ENGINE_STR(MERGE_ENGINE_BUILD_KEY);  // which sources and flags it was built from (kernel_build.py)
  m.def("delta_cutoffs", &merge_engine::delta_cutoffs_cpu, kReleaseGil,
        "Cut-offs (key, index) of the first counts[j] elements of the stable order of |expert - base|");
  m.def("merge_task_vectors", &merge_engine::merge_task_vectors_cpu, kReleaseGil,
        "Fused sparsify + weight + (sign election, disjoint mean) + lambda + base, one pass (into out if given)",
        py::arg("base"), py::arg("experts"), py::arg("weights"), py::arg("mode"), py::arg("counts_lo"),
        py::arg("counts_hi"), py::arg("densities"), py::arg("epsilons"), py::arg("consensus"), py::arg("normalize"),
        py::arg("rescale"), py::arg("lambda"), py::arg("key0"), py::arg("key1"), py::arg("out") = py::none());
  m.def("set_huge_page_outputs", [](bool on) { merge_engine::huge_page_outputs = on; },
        "Whether the kernels advise their fresh outputs onto transparent huge pages (default: yes)");
  m.def("philox_uniforms", &merge_engine::philox_uniforms_cpu, kReleaseGil,
        "The uniforms of elements start .. start + numel - 1 of one stream, as DARE/DELLA draw them");
  m.def("accumulate_fisher", &merge_engine::accumulate_fisher_cpu, kReleaseGil, "In place: fisher += scale * grad^2 (fp32 math)");
  m.def("fisher_merge", &merge_engine::fisher_merge_cpu, kReleaseGil,
        "sum_j c_j max(F_j, floor_j) theta_j / sum_j c_j max(F_j, floor_j), one pass (into out if given)",
        py::arg("params"), py::arg("fishers"), py::arg("coefficients"), py::arg("floors"), py::arg("out") = py::none());
  m.def("accumulate_gram", &merge_engine::accumulate_gram_cpu, kReleaseGil,
        "In place: the upper triangle of gram += x^T x over the rows where mask is True (fp32 sums)",
        py::arg("gram"), py::arg("x"), py::arg("mask") = py::none());
  m.def("gather_blocks", &merge_engine::gather_blocks_cpu, kReleaseGil,
        "A layer's tensor whose block b is block src_block[b] of tensors[src_layer[b]]");
  m.def("scatter_add_blocks", &merge_engine::scatter_add_blocks_cpu, kReleaseGil,
        "In place: block src_block[b] of targets[src_layer[b]] += block b of values (the adjoint of gather_blocks)");
  m.def("swap_blocks", &merge_engine::swap_blocks_cpu, kReleaseGil,
        "In place: swaps the blocks (layer_a, block_a) and (layer_b, block_b) of each row of pairs");
}
