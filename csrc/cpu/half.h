// bfloat16 and float16 storage: scalar conversions to and from float32 (round to nearest even, NaN kept
// NaN), shared by the per-ISA widening kernels (half.cpp). Storage is the raw 16 bits (uint16_t).
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 is the top half of a float32: widening is exact, a shift.
inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round to nearest even on the integer bits: adding 0x7fff plus the lowest kept bit carries into the kept
// half exactly when the dropped half is above the midpoint (or at it with an odd kept half); a carry out of
// the mantissa steps the exponent, up to inf. A NaN keeps its sign and top payload, made quiet (a NaN whose
// payload sits in the low 16 bits alone would otherwise truncate to inf).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// IEEE binary16 <-> float32 in plain integer code (the F16C instructions do the same on avx2/avx512).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) return bits_f32(sign | f32_bits(float(m) * 5.9604644775390625e-8f));  // m * 2^-24, exact
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return uint16_t(sign | 0x7e00 | ((x >> 13) & 0x3ff));  // NaN, quiet
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // from 65520 (halfway past the largest) up: inf
  if (x < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 (whose ulp is 2^-24, the subnormal step) rounds the
    // magnitude to nearest even in the float unit; the low bits of the sum are then the result.
    return uint16_t(sign | (f32_bits(bits_f32(x) + 0.5f) - 0x3f000000u));
  }
  // Rebias the exponent (127 -> 15) and round: 0xfff plus the lowest kept bit carries past the dropped 13
  // bits exactly when rounding to nearest even goes up.
  x += 0xc8000fffu + ((x >> 13) & 1);
  return uint16_t(sign | (x >> 13));
}

#if defined(FASTNN_ISA_avx512)
// f32_to_bf16 on 16 lanes: the bfloat16 bits in the low half of each 32-bit lane.
FASTNN_INLINE __m512i round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x), hi = _mm512_srli_epi32(u, 16);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                               _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));  // NaN: quiet, sign and top payload kept
}
#endif

// The 16-bit storage types as distinct C++ types, so packing code can be templated on the element it reads;
// widen1 gives the float32 value of one element (the identity for float and double).
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };
inline float widen1(float x) { return x; }
inline double widen1(double x) { return x; }
inline float widen1(Bf16 x) { return bf16_to_f32(x.bits); }
inline float widen1(F16 x) {
#if defined(FASTNN_ISA_avx512) || defined(FASTNN_ISA_avx2)
  return _cvtsh_ss(x.bits);
#else
  return f16_to_f32(x.bits);
#endif
}

// d[i] = s[i] widened / rounded, for i in [b, e).
inline void widen_range(const uint16_t* FASTNN_RESTRICT s, float* FASTNN_RESTRICT d, int64_t b, int64_t e, bool bf16) {
  int64_t i = b;
  if (bf16) {
#if defined(FASTNN_ISA_avx512)
    for (; i + 16 <= e; i += 16)
      _mm512_storeu_si512(d + i, _mm512_slli_epi32(
                                     _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), 16));
#elif defined(FASTNN_ISA_avx2)
    for (; i + 8 <= e; i += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), 16));
#endif
    for (; i < e; ++i) d[i] = bf16_to_f32(s[i]);
    return;
  }
#if defined(FASTNN_ISA_avx512)
  for (; i + 16 <= e; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(FASTNN_ISA_avx2)
  for (; i + 8 <= e; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < e; ++i) d[i] = f16_to_f32(s[i]);
}

inline void narrow_range(const float* FASTNN_RESTRICT s, uint16_t* FASTNN_RESTRICT d, int64_t b, int64_t e, bool bf16) {
  int64_t i = b;
  if (bf16) {
    // f32_to_bf16 on whole vectors (the scalar loop was left mostly unvectorized: ~2x slower Adam).
#if defined(FASTNN_ISA_avx512)
    for (; i + 16 <= e; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm512_cvtepi32_epi16(round_bf16(_mm512_loadu_ps(s + i))));
#elif defined(FASTNN_ISA_avx2)
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= e; i += 8) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)), hi = _mm256_srli_epi32(u, 16);
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(hi, one))), 16);
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);  // |u| >= 0: signed compare
      r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
      // 32 -> 16 bits (values <= 0xffff, so the unsigned saturation is exact); packus works per 128-bit lane
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_castsi256_si128(packed));
    }
#endif
    for (; i < e; ++i) d[i] = f32_to_bf16(s[i]);
    return;
  }
#if defined(FASTNN_ISA_avx512)
  for (; i + 16 <= e; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(FASTNN_ISA_avx2)
  for (; i + 8 <= e; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < e; ++i) d[i] = f32_to_f16(s[i]);
}

}  // namespace fastnn::cpu::FASTNN_ISA
