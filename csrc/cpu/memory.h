// Output tensors of the CPU kernels on transparent huge pages: a fresh output is first touched by the
// kernel itself, and with 4 KiB pages that touch costs a page fault per 4 KiB, and every pass over
// the big tensors a TLB miss per 4 KiB per stream (a TIES merge of 8 experts reads 9 streams at
// once). torch's CPU allocator asks for huge pages only under THP_MEM_ALLOC_ENABLE=1.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace merge_engine {

// Asks the kernel to back the whole 2 MiB pages inside [p, p + bytes) with huge pages, before their
// first touch. Advice only: where it is refused (no THP, another OS), pages stay as they are.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
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

}  // namespace merge_engine
