// Output tensors of the CPU kernels on transparent huge pages: a fresh output is first touched by the
// kernel itself, and with 4 KiB pages that touch costs a page fault per 4 KiB, and every pass over
// the big tensors a TLB miss per 4 KiB per stream (a TIES merge of 8 experts reads 9 streams at
// once). torch's CPU allocator asks for huge pages only under THP_MEM_ALLOC_ENABLE=1.
// Not where the host takes back free huge pages (merge_engine/runtime.py:
// host_reclaims_free_huge_pages): there a fresh huge page costs more at its first touch than its 512
// small pages, and merge_engine.ops.backends turns the advice off when it loads this module.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace merge_engine {

// Whether advise_huge_pages asks for huge pages (set_huge_page_outputs in bindings.cpp).
inline std::atomic<bool> huge_page_outputs{true};

// Asks the kernel to back the whole 2 MiB pages inside [p, p + bytes) with huge pages, before their
// first touch. Advice only: where it is refused (no THP, another OS), pages stay as they are.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_page_outputs.load(std::memory_order_relaxed)) return;
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// torch::empty_like(x), advised onto huge pages when it spans any
inline torch::Tensor empty_output_like(const torch::Tensor& x) {
  auto out = torch::empty_like(x);
  advise_huge_pages(out.storage().mutable_data(), out.storage().nbytes());
  return out;
}

// A kernel's output of x's shape and dtype: the caller's buffer when one is given (the engine recycles
// them: fresh memory costs a zeroed page per first touch), checked to be a contiguous CPU tensor of
// that shape and dtype that overlaps no input (a pass reads inputs after writing earlier blocks);
// else empty_output_like(x).
inline torch::Tensor output_for(const std::optional<torch::Tensor>& buffer, const torch::Tensor& x,
                                const std::vector<torch::Tensor>& inputs) {
  if (!buffer) return empty_output_like(x);
  const auto& o = *buffer;
  TORCH_CHECK(o.device().is_cpu() && o.is_contiguous() && o.scalar_type() == x.scalar_type() && o.sizes() == x.sizes(),
              "merge_engine CPU kernel: out must be a contiguous CPU tensor of the output's shape and dtype");
  auto overlaps = [&](const torch::Tensor& t) {
    const char *a = static_cast<const char*>(o.data_ptr()), *b = static_cast<const char*>(t.data_ptr());
    return a < b + t.nbytes() && b < a + o.nbytes();
  };
  TORCH_CHECK(std::none_of(inputs.begin(), inputs.end(), overlaps), "merge_engine CPU kernel: out must not overlap an input");
  return o;
}

}  // namespace merge_engine
