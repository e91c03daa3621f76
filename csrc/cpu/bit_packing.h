// Keep flags as bits: the rescale pass stores the flags it draws, the merge pass reads them back.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

namespace merge_engine::task_vectors {

// flags[0, len) (each 0 or 1) as bits, 8 per byte, flag b of a byte's eight in bit 7 - b (what one
// multiplication gathers: byte b of x lands in bit 63 - b of x * 0x8040201008040201); and back,
// through a table of each byte's eight flags
inline void pack_bits(const uint8_t* flags, int64_t len, uint8_t* bits) {
  auto gather = [](uint64_t x) { return static_cast<uint8_t>((x * 0x8040201008040201ull) >> 56); };
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {  // a fixed-size copy: one load, where a variable one copies bytes
    uint64_t x;
    std::memcpy(&x, flags + j, 8);
    bits[j / 8] = gather(x);
  }
  if (j < len) {
    uint64_t x = 0;
    std::memcpy(&x, flags + j, static_cast<size_t>(len - j));
    bits[j / 8] = gather(x);
  }
}

inline void unpack_bits(const uint8_t* bits, int64_t len, uint8_t* flags) {
  static const auto table = [] {
    std::array<uint64_t, 256> t{};
    for (int v = 0; v < 256; ++v)
      for (int b = 0; b < 8; ++b) t[v] |= static_cast<uint64_t>((v >> (7 - b)) & 1) << (8 * b);
    return t;
  }();
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) std::memcpy(flags + j, &table[bits[j / 8]], 8);
  if (j < len) std::memcpy(flags + j, &table[bits[j / 8]], static_cast<size_t>(len - j));
}

}  // namespace merge_engine::task_vectors
