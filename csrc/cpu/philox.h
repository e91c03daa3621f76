// Philox4x32-10 on the CPU's 16 lanes (simd.h): DARE's and DELLA's uniforms, as uniform4 in
// ../task_vectors.h draws them one group at a time. In a header: the keep rule draws a work item's
// uniforms right before comparing them.
#pragma once

#include <cstdint>

#include "../task_vectors.h"
#include "simd.h"

namespace merge_engine::task_vectors {

// The four uniforms of each of the 4-element groups first .. first + groups - 1 of one stream
// (uniform4 in ../task_vectors.h), kWidth groups at a time: Philox's rounds on lanes, then the words
// interleaved into element order. A batch whose low counter word would wrap takes the scalar path.
inline void uniforms(int64_t first, int64_t groups, uint32_t stream, uint32_t k0, uint32_t k1, float* u) {
  using namespace simd;
  int64_t q = 0;
  alignas(32) float words[4][kWidth];
  for (; q + kWidth <= groups && static_cast<uint32_t>(first + q) <= UINT32_MAX - kWidth; q += kWidth) {
    const uint64_t g = static_cast<uint64_t>(first + q);
    I c[4] = {add(iset(static_cast<int32_t>(g)), iota()), iset(static_cast<int32_t>(g >> 32)),
              iset(static_cast<int32_t>(stream)), iset(0)};
    uint32_t key0 = k0, key1 = k1;
    for (int r = 0; r < 10; ++r) {  // philox4x32_10, lane-wise
      I hi0, lo0, hi1, lo1;
      mulhilo(c[0], 0xD2511F53u, hi0, lo0);
      mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
      c[0] = hi1 ^ c[1] ^ iset(static_cast<int32_t>(key0));
      c[2] = hi0 ^ c[3] ^ iset(static_cast<int32_t>(key1));
      c[1] = lo1, c[3] = lo0;
      key0 += 0x9E3779B9u, key1 += 0xBB67AE85u;
    }
    for (int w = 0; w < 4; ++w) store(words[w], mul(to_float(shr(c[w], 8)), fset(5.9604644775390625e-08f)));
    for (int l = 0; l < kWidth; ++l)
      for (int w = 0; w < 4; ++w) u[4 * (q + l) + w] = words[w][l];
  }
  for (; q < groups; ++q) uniform4(first + q, stream, k0, k1, u + 4 * q);
}

}  // namespace merge_engine::task_vectors
