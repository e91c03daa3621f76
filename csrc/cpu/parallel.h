// Work items handed to the threads in chunks as each thread asks for one, rather than split evenly up
// front (at::parallel_for): on a machine with few cores the engine's reads and writes take turns with
// the merge's threads, and with an even split the region lasts as long as its most delayed thread,
// while the others wait. Chunks are numbered, so that sums taken per chunk and added in chunk order do
// not depend on the thread count or on which thread ran which chunk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace merge_engine {

inline int64_t chunk_count(int64_t count, int64_t per_chunk) { return (count + per_chunk - 1) / per_chunk; }

// f(lo, hi, chunk) for each chunk [lo, hi) of `per_chunk` items of [0, count), as threads free up.
// `per_chunk` large enough that a chunk's work dwarfs one atomic increment.
template <typename F> void parallel_chunks(int64_t count, int64_t per_chunk, const F& f) {
  const int64_t chunks = chunk_count(count, per_chunk);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) f(c * per_chunk, std::min(count, (c + 1) * per_chunk), c);
  });
}

}  // namespace merge_engine
