// Sixteen 32-bit lanes for the CPU kernels' fused loops: two AVX2 registers per value (with F16C for
// float16) when the build targets them (-march=native on x86-64), else plain arrays of sixteen. Two
// registers per value give the out-of-order core two independent dependency chains in every step,
// which the long, latency-bound chains of the fused merge need (a division and several roundings per
// element). Every float operation is one IEEE operation, as in scalar code (the build uses
// -ffp-contract=off), and the dtype helpers round exactly as dtypes.h does, so a kernel written on
// these lanes matches the scalar loops and the PyTorch references bit for bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define MERGE_ENGINE_AVX2 1
#endif

// for the per-step lambdas of the fused loops: a call per step would cost as much as the step
// (every constant re-broadcast, every accumulator through memory)
#if defined(__GNUC__)
#define ME_ALWAYS_INLINE __attribute__((always_inline))
#else
#define ME_ALWAYS_INLINE
#endif

namespace merge_engine {
namespace simd {

constexpr int kWidth = 16;  // lanes per value

#if MERGE_ENGINE_AVX2
struct F { __m256 h[2]; };   // 16 floats
struct I { __m256i h[2]; };  // 16 int32; comparisons give all-ones / zero lanes

#define ME_F(expr) F{{[&](int k) { return expr; }(0), [&](int k) { return expr; }(1)}}
#define ME_I(expr) I{{[&](int k) { return expr; }(0), [&](int k) { return expr; }(1)}}
inline F fset(float x) { return ME_F(_mm256_set1_ps(x)); }
inline I iset(int32_t x) { return ME_I(_mm256_set1_epi32(x)); }
inline I iota() { return I{{_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)}}; }
inline F add(F a, F b) { return ME_F(_mm256_add_ps(a.h[k], b.h[k])); }
inline F sub(F a, F b) { return ME_F(_mm256_sub_ps(a.h[k], b.h[k])); }
inline F mul(F a, F b) { return ME_F(_mm256_mul_ps(a.h[k], b.h[k])); }
inline F div(F a, F b) { return ME_F(_mm256_div_ps(a.h[k], b.h[k])); }
inline I gt(F a, F b) { return ME_I(_mm256_castps_si256(_mm256_cmp_ps(a.h[k], b.h[k], _CMP_GT_OQ))); }
inline I ge(F a, F b) { return ME_I(_mm256_castps_si256(_mm256_cmp_ps(a.h[k], b.h[k], _CMP_GE_OQ))); }
inline I eq(F a, F b) { return ME_I(_mm256_castps_si256(_mm256_cmp_ps(a.h[k], b.h[k], _CMP_EQ_OQ))); }
inline F select(I m, F yes, F no) { return ME_F(_mm256_blendv_ps(no.h[k], yes.h[k], _mm256_castsi256_ps(m.h[k]))); }
inline F bits_to_f(I x) { return ME_F(_mm256_castsi256_ps(x.h[k])); }
inline I f_to_bits(F x) { return ME_I(_mm256_castps_si256(x.h[k])); }

inline I add(I a, I b) { return ME_I(_mm256_add_epi32(a.h[k], b.h[k])); }
inline I sub(I a, I b) { return ME_I(_mm256_sub_epi32(a.h[k], b.h[k])); }
inline I gt(I a, I b) { return ME_I(_mm256_cmpgt_epi32(a.h[k], b.h[k])); }
inline I max(I a, I b) { return ME_I(_mm256_max_epi32(a.h[k], b.h[k])); }
inline I eq(I a, I b) { return ME_I(_mm256_cmpeq_epi32(a.h[k], b.h[k])); }
inline I operator&(I a, I b) { return ME_I(_mm256_and_si256(a.h[k], b.h[k])); }
inline I operator|(I a, I b) { return ME_I(_mm256_or_si256(a.h[k], b.h[k])); }
inline I andnot(I a, I b) { return ME_I(_mm256_andnot_si256(b.h[k], a.h[k])); }  // a & ~b
inline I shr(I a, int s) { return ME_I(_mm256_srli_epi32(a.h[k], s)); }
inline I shl(I a, int s) { return ME_I(_mm256_slli_epi32(a.h[k], s)); }
inline I operator^(I a, I b) { return ME_I(_mm256_xor_si256(a.h[k], b.h[k])); }
inline F to_float(I a) { return ME_F(_mm256_cvtepi32_ps(a.h[k])); }  // exact below 2^24
inline void store(float* p, F x) { _mm256_storeu_ps(p, x.h[0]), _mm256_storeu_ps(p + 8, x.h[1]); }
// the 64-bit products a * m of unsigned lanes: high and low 32 bits (Philox's mulhilo)
inline void mulhilo(I a, uint32_t m, I& hi, I& lo) {
  const __m256i mv = _mm256_set1_epi32(static_cast<int32_t>(m));
  for (int k = 0; k < 2; ++k) {
    const __m256i even = _mm256_mul_epu32(a.h[k], mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(a.h[k], 32), mv);
    lo.h[k] = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi.h[k] = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
}
inline int lanes_set(I m) {  // bit l: lane l
  return _mm256_movemask_ps(_mm256_castsi256_ps(m.h[0])) | _mm256_movemask_ps(_mm256_castsi256_ps(m.h[1])) << 8;
}
inline void store(int32_t* p, I x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x.h[0]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 8), x.h[1]);
}
inline int64_t sum(I x) {
  alignas(32) int32_t a[kWidth];
  store(a, x);
  int64_t s = 0;
  for (int l = 0; l < kWidth; ++l) s += a[l];
  return s;
}
// 16 uint8 / uint16 lanes widened to int32
inline I load_u8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return I{{_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))}};
}
inline I load_u16(const void* p) {
  const __m128i* q = static_cast<const __m128i*>(p);
  return ME_I(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + k)));
}
inline void store_u16(void* p, I x) {  // lanes already in [0, 0xFFFF]
  // packus interleaves the two registers' 128-bit halves; the 64-bit permute restores lane order
  const __m256i packed = _mm256_packus_epi32(x.h[0], x.h[1]);
  _mm256_storeu_si256(static_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
// Writes the lanes of a where m is set, in lane order, to out (which needs room for kWidth entries
// past what is kept) and returns how many: a compaction without a branch per lane,
// whose pattern (a few percent of lanes, at random) would defeat the branch predictor.
namespace detail {
struct CompressTable {  // for each 8-bit mask, the lane indices of its set bits first
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) lanes[m][n++] = l;
      for (; n < 8; ++n) lanes[m][n] = 0;
    }
  }
};
inline const CompressTable compress_table;
}  // namespace detail
inline int compress_store(I m, I a, int32_t* out) {
  int kept = 0;
  for (int k = 0; k < 2; ++k) {
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(m.h[k]));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(detail::compress_table.lanes[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kept), _mm256_permutevar8x32_epi32(a.h[k], order));
    kept += __builtin_popcount(bits);
  }
  return kept;
}
// Sixteen double lanes (four registers), for sums of float lanes in double: a lane's float value is
// exact in double, so each lane's sum rounds only in its additions.
struct D { __m256d h[4]; };
inline D dzero() { return D{{_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()}}; }
inline D add(D s, F x) {
  for (int k = 0; k < 2; ++k) {
    s.h[2 * k] = _mm256_add_pd(s.h[2 * k], _mm256_cvtps_pd(_mm256_castps256_ps128(x.h[k])));
    s.h[2 * k + 1] = _mm256_add_pd(s.h[2 * k + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(x.h[k], 1)));
  }
  return s;
}
inline double sum(D s) {
  alignas(32) double a[4];
  _mm256_store_pd(a, _mm256_add_pd(_mm256_add_pd(s.h[0], s.h[1]), _mm256_add_pd(s.h[2], s.h[3])));
  return (a[0] + a[1]) + (a[2] + a[3]);
}
// Sixteen int16 lanes in one register, for counting 15-bit keys: half the compare-and-count
// operations of int32 lanes. Their lane order is their own (packus interleaves the two registers'
// 128-bit halves), which no count depends on.
struct I16 { __m256i v; };
inline I16 pack16_unsigned(I a) { return I16{_mm256_packus_epi32(a.h[0], a.h[1])}; }  // lanes in [0, 0xFFFF]
inline I16 set16(int16_t x) { return I16{_mm256_set1_epi16(x)}; }
inline I16 sub(I16 a, I16 b) { return I16{_mm256_sub_epi16(a.v, b.v)}; }
inline I16 gt(I16 a, I16 b) { return I16{_mm256_cmpgt_epi16(a.v, b.v)}; }
inline I16 operator&(I16 a, I16 b) { return I16{_mm256_and_si256(a.v, b.v)}; }
inline bool any(I16 m) { return !_mm256_testz_si256(m.v, m.v); }
inline int64_t sum(I16 x) { return sum(I{{_mm256_madd_epi16(x.v, _mm256_set1_epi16(1)), _mm256_setzero_si256()}}); }
#undef ME_F
#undef ME_I
#else
struct F { float v[kWidth]; };
struct I { int32_t v[kWidth]; };

#define ME_LANES(expr) for (int l = 0; l < kWidth; ++l) r.v[l] = (expr)
inline F fset(float x) { F r; ME_LANES(x); return r; }
inline I iset(int32_t x) { I r; ME_LANES(x); return r; }
inline I iota() { I r; ME_LANES(l); return r; }
inline F add(F a, F b) { F r; ME_LANES(a.v[l] + b.v[l]); return r; }
inline F sub(F a, F b) { F r; ME_LANES(a.v[l] - b.v[l]); return r; }
inline F mul(F a, F b) { F r; ME_LANES(a.v[l] * b.v[l]); return r; }
inline F div(F a, F b) { F r; ME_LANES(a.v[l] / b.v[l]); return r; }
inline I gt(F a, F b) { I r; ME_LANES(a.v[l] > b.v[l] ? -1 : 0); return r; }
inline I ge(F a, F b) { I r; ME_LANES(a.v[l] >= b.v[l] ? -1 : 0); return r; }
inline I eq(F a, F b) { I r; ME_LANES(a.v[l] == b.v[l] ? -1 : 0); return r; }
inline F select(I m, F yes, F no) { F r; ME_LANES(m.v[l] ? yes.v[l] : no.v[l]); return r; }
inline F bits_to_f(I x) { F r; std::memcpy(r.v, x.v, sizeof r.v); return r; }
inline I f_to_bits(F x) { I r; std::memcpy(r.v, x.v, sizeof r.v); return r; }

inline I add(I a, I b) { I r; ME_LANES(static_cast<int32_t>(static_cast<uint32_t>(a.v[l]) + static_cast<uint32_t>(b.v[l]))); return r; }
inline I sub(I a, I b) { I r; ME_LANES(static_cast<int32_t>(static_cast<uint32_t>(a.v[l]) - static_cast<uint32_t>(b.v[l]))); return r; }
inline I gt(I a, I b) { I r; ME_LANES(a.v[l] > b.v[l] ? -1 : 0); return r; }
inline I max(I a, I b) { I r; ME_LANES(a.v[l] > b.v[l] ? a.v[l] : b.v[l]); return r; }
inline I eq(I a, I b) { I r; ME_LANES(a.v[l] == b.v[l] ? -1 : 0); return r; }
inline I operator&(I a, I b) { I r; ME_LANES(a.v[l] & b.v[l]); return r; }
inline I operator|(I a, I b) { I r; ME_LANES(a.v[l] | b.v[l]); return r; }
inline I andnot(I a, I b) { I r; ME_LANES(a.v[l] & ~b.v[l]); return r; }
inline I shr(I a, int s) { I r; ME_LANES(static_cast<int32_t>(static_cast<uint32_t>(a.v[l]) >> s)); return r; }
inline I shl(I a, int s) { I r; ME_LANES(static_cast<int32_t>(static_cast<uint32_t>(a.v[l]) << s)); return r; }
inline I operator^(I a, I b) { I r; ME_LANES(a.v[l] ^ b.v[l]); return r; }
inline F to_float(I a) { F r; ME_LANES(static_cast<float>(a.v[l])); return r; }
inline void store(float* p, F x) { std::memcpy(p, x.v, sizeof x.v); }
inline void mulhilo(I a, uint32_t m, I& hi, I& lo) {
  for (int l = 0; l < kWidth; ++l) {
    const uint64_t p = static_cast<uint64_t>(static_cast<uint32_t>(a.v[l])) * m;
    hi.v[l] = static_cast<int32_t>(p >> 32), lo.v[l] = static_cast<int32_t>(p);
  }
}
inline int lanes_set(I m) { int r = 0; for (int l = 0; l < kWidth; ++l) r |= (m.v[l] < 0) << l; return r; }
inline void store(int32_t* p, I x) { std::memcpy(p, x.v, sizeof x.v); }
inline int64_t sum(I x) { int64_t s = 0; for (int l = 0; l < kWidth; ++l) s += x.v[l]; return s; }
inline I load_u8(const uint8_t* p) { I r; ME_LANES(p[l]); return r; }
inline I load_u16(const void* p) { uint16_t a[kWidth]; std::memcpy(a, p, sizeof a); I r; ME_LANES(a[l]); return r; }
inline void store_u16(void* p, I x) {  // lanes already in [0, 0xFFFF]
  uint16_t a[kWidth];
  for (int l = 0; l < kWidth; ++l) a[l] = static_cast<uint16_t>(x.v[l]);
  std::memcpy(p, a, sizeof a);
}
inline int compress_store(I m, I a, int32_t* out) {
  int kept = 0;
  for (int l = 0; l < kWidth; ++l)
    if (m.v[l]) out[kept++] = a.v[l];
  return kept;
}
struct D { double v[kWidth]; };
inline D dzero() { D r; for (int l = 0; l < kWidth; ++l) r.v[l] = 0; return r; }
inline D add(D s, F x) { for (int l = 0; l < kWidth; ++l) s.v[l] += x.v[l]; return s; }
inline double sum(D s) { double t = 0; for (int l = 0; l < kWidth; ++l) t += s.v[l]; return t; }
struct I16 { int16_t v[kWidth]; };
inline I16 pack16_unsigned(I a) { I16 r; ME_LANES(static_cast<int16_t>(a.v[l])); return r; }  // lanes in [0, 0xFFFF]
inline I16 set16(int16_t x) { I16 r; ME_LANES(x); return r; }
inline I16 sub(I16 a, I16 b) { I16 r; ME_LANES(static_cast<int16_t>(a.v[l] - b.v[l])); return r; }
inline I16 gt(I16 a, I16 b) { I16 r; ME_LANES(a.v[l] > b.v[l] ? -1 : 0); return r; }
inline I16 operator&(I16 a, I16 b) { I16 r; ME_LANES(a.v[l] & b.v[l]); return r; }
inline bool any(I16 m) { for (int l = 0; l < kWidth; ++l) if (m.v[l]) return true; return false; }
inline int64_t sum(I16 x) { int64_t s = 0; for (int l = 0; l < kWidth; ++l) s += x.v[l]; return s; }
#undef ME_LANES
#endif

inline F masked(F x, I m) { return bits_to_f(f_to_bits(x) & m); }       // x where m, else +0.0f

// Storage dtype T on the lanes: load, round a float result to T (as dtypes.h's
// rnd<T>), round and store one, and the magnitude key of a value of T (ops/select.py). Which element
// a lane holds is T's choice (bf16's is not index order): keep flags and element offsets come in the
// same order through load_flags and lane_index, and round_store writes index order.
template <typename T> struct Lanes;

template <> struct Lanes<float> {
  static F load(const float* p) {
    F x;
#if MERGE_ENGINE_AVX2
    x.h[0] = _mm256_loadu_ps(p), x.h[1] = _mm256_loadu_ps(p + 8);
#else
    std::memcpy(x.v, p, sizeof x.v);
#endif
    return x;
  }
  static I load_flags(const uint8_t* p) { return load_u8(p); }
  static I lane_index() { return iota(); }
  static F round(F x) { return x; }
  static void round_store(float* p, F x) { store(p, x); }
  static void store(float* p, F x) {
#if MERGE_ENGINE_AVX2
    _mm256_storeu_ps(p, x.h[0]), _mm256_storeu_ps(p + 8, x.h[1]);
#else
    std::memcpy(p, x.v, sizeof x.v);
#endif
  }
  static I key(F rounded) { return f_to_bits(rounded) & iset(0x7FFFFFFF); }
};

template <> struct Lanes<c10::BFloat16> {
#if MERGE_ENGINE_AVX2
  // Lanes in an order of their own: AVX2's unpacks work within 128-bit halves, so loading 16 values
  // as the high halves of 32-bit lanes (one unpack per register, rather than a widening load and a
  // shift) puts elements 0-3 and 8-11 in the first register, 4-7 and 12-15 in the second.
  // round_store's pack restores index order, and load_flags and lane_index follow the same order.
  static F load(const c10::BFloat16* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
    return F{{_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, x)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, x))}};
  }
  static I load_flags(const uint8_t* p) {  // 16 bytes as 0/1 lanes, in load's order
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i z = _mm256_setzero_si256();
    return I{{_mm256_unpacklo_epi16(w, z), _mm256_unpackhi_epi16(w, z)}};
  }
  static I lane_index() {  // each lane's element offset, in load's order
    return I{{_mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11), _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15)}};
  }
  static void round_store(c10::BFloat16* p, F x) {  // round's bits, shifted before the mask clears them
    __m256i r[2];
    for (int k = 0; k < 2; ++k) {
      const __m256i b = _mm256_castps_si256(x.h[k]);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
      r[k] = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(r[0], r[1]));  // in index order
  }
#else
  static F load(const c10::BFloat16* p) { return bits_to_f(shl(load_u16(p), 16)); }
  static I load_flags(const uint8_t* p) { return load_u8(p); }
  static I lane_index() { return iota(); }
  static void round_store(c10::BFloat16* p, F x) {  // round's bits, shifted before the mask clears them
    const I b = f_to_bits(x);
    store_u16(p, shr(add(b, add(iset(0x7FFF), shr(b, 16) & iset(1))), 16));
  }
#endif
  static F round(F x) {  // round to nearest even on the bits, without dtypes.h's NaN select: a NaN here comes
                         // from bf16 values (x86 keeps their zero low bits) or is refused by the merge pass
    I b = f_to_bits(x);
    b = add(b, add(iset(0x7FFF), shr(b, 16) & iset(1)));
    return bits_to_f(b & iset(static_cast<int32_t>(0xFFFF0000u)));
  }
  static I key(F rounded) { return shr(f_to_bits(rounded), 16) & iset(0x7FFF); }
  static I16 key16(F x) {  // key(round(x)): round's bits shifted, the sign cleared in 16-bit lanes
    const I b = f_to_bits(x);
    return pack16_unsigned(shr(add(b, add(iset(0x7FFF), shr(b, 16) & iset(1))), 16)) & set16(0x7FFF);
  }
};

template <> struct Lanes<c10::Half> {
  static I load_flags(const uint8_t* p) { return load_u8(p); }
  static I lane_index() { return iota(); }
#if MERGE_ENGINE_AVX2
  static __m128i to_half(__m256 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F load(const c10::Half* p) {
    F x;
    for (int k = 0; k < 2; ++k) x.h[k] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + k));
    return x;
  }
  static F round(F x) { return F{{_mm256_cvtph_ps(to_half(x.h[0])), _mm256_cvtph_ps(to_half(x.h[1]))}}; }
  static void round_store(c10::Half* p, F x) {  // the conversion rounds
    for (int k = 0; k < 2; ++k) _mm_storeu_si128(reinterpret_cast<__m128i*>(p) + k, to_half(x.h[k]));
  }
  static I key(F rounded) {
    return I{{_mm256_cvtepu16_epi32(to_half(rounded.h[0])), _mm256_cvtepu16_epi32(to_half(rounded.h[1]))}} &
           iset(0x7FFF);
  }
  static I16 key16(F x) { return I16{_mm256_set_m128i(to_half(x.h[1]), to_half(x.h[0]))} & set16(0x7FFF); }
#else
  static F load(const c10::Half* p) { F x; for (int l = 0; l < kWidth; ++l) x.v[l] = static_cast<float>(p[l]); return x; }
  static F round(F x) { for (int l = 0; l < kWidth; ++l) x.v[l] = static_cast<float>(c10::Half(x.v[l])); return x; }
  static void round_store(c10::Half* p, F x) { for (int l = 0; l < kWidth; ++l) p[l] = c10::Half(x.v[l]); }
  static I key(F rounded) { I k; for (int l = 0; l < kWidth; ++l) k.v[l] = c10::Half(rounded.v[l]).x & 0x7FFF; return k; }
  static I16 key16(F x) { return pack16_unsigned(key(x)); }
#endif
};

}  // namespace simd
}  // namespace merge_engine
