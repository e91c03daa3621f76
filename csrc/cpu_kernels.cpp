// The CPU kernels as one translation unit: the files by algorithm in csrc/cpu/, compiled together.
// torch/extension.h is parsed once instead of once per file, so the module builds in about a third of the
// time (88 s against about 4 min on 2 cores), and the kernels run the same (bench/RESULTS.md, issue 16).
// Every csrc/cpu/*.cpp is listed (tests/ops/test_backends.py checks).
#include "cpu/bindings.cpp"
#include "cpu/bracketed_select.cpp"
#include "cpu/fisher.cpp"
#include "cpu/fused_merge.cpp"
#include "cpu/gram.cpp"
#include "cpu/permute.cpp"
#include "cpu/radix_select.cpp"
#include "cpu/rescale.cpp"
#include "cpu/row_ranks.cpp"
#include "cpu/sparsify.cpp"
#include "cpu/task_vectors.cpp"
