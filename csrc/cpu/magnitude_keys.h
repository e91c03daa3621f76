// Magnitude keys of the task-vector family's CPU kernels: the key of a value of T (the bit pattern of
// |x|, ../task_vectors.h), of a delta expert - base formed as the reference forms it, and the NaN/Inf
// check of a tensor by its keys. Headers only: the keys are formed inside the selects' and the fused
// merge's loops.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <numeric>
#include <vector>

#include "../task_vectors.h"
#include "dtypes.h"

namespace merge_engine::task_vectors {

template <typename T> int64_t key_of(T x);
template <> inline int64_t key_of<float>(float x) { return key_of_float(x); }
template <> inline int64_t key_of<c10::BFloat16>(c10::BFloat16 x) { return key_of_bits16(x.x); }
template <> inline int64_t key_of<c10::Half>(c10::Half x) { return key_of_bits16(x.x); }

template <typename T> int64_t inf_key();
template <> inline int64_t inf_key<float>() { return kInfKey32; }
template <> inline int64_t inf_key<c10::BFloat16>() { return kInfKey16BFloat; }
template <> inline int64_t inf_key<c10::Half>() { return kInfKey16Half; }

// The delta as the reference forms it: expert - base in T (computed in float, rounded once).
template <typename T> T delta_of(T e, T b) { return round_to<T>(to_f(e) - to_f(b)); }

// the kernel dtypes
template <> inline float delta_of<float>(float e, float b) { return e - b; }

// The magnitude key of element i of expert - base.
template <typename T> int32_t delta_key(const T* e, const T* b, int64_t i) {
  return static_cast<int32_t>(key_of<T>(delta_of<T>(e[i], b[i])));
}
// NaN or Inf in x raise ValueError; with allow_inf, only NaN (+-Inf are the largest magnitudes).
template <typename T> void check_finite(const T* x, int64_t n, const char* what, bool allow_inf = false) {
  std::vector<int64_t> bad(at::get_num_threads(), 0);
  const int64_t limit = inf_key<T>() + (allow_inf ? 1 : 0);  // NaN keys are above Inf's
  at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
    int64_t c = 0;
    for (int64_t i = lo; i < hi; ++i) c += key_of<T>(x[i]) >= limit;
    bad[at::get_thread_num()] += c;
  });
  int64_t total = std::accumulate(bad.begin(), bad.end(), int64_t{0});
  TORCH_CHECK_VALUE(total == 0, what, " has ", total, allow_inf ? " NaN" : " NaN or Inf",
                    " value(s); a magnitude ordering is undefined");
}
}  // namespace merge_engine::task_vectors
