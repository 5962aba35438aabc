// Philox-4x32-10 (Salmon et al., SC'11) on vectors of 32-bit counter words, one counter per lane: the random
// bits of the attention dropout. The bits are the same as fastnn/_dropout.py's (which documents the mapping
// from (seed, offset, batch, row, column) to counter and key) and cuda/attention.cu's.
#pragma once
#include <cstdint>

#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

typedef uint32_t U32Vec __attribute__((vector_size(FASTNN_VEC_BYTES)));
typedef int32_t I32Vec __attribute__((vector_size(FASTNN_VEC_BYTES)));
constexpr int64_t kU32Lanes = FASTNN_VEC_BYTES / 4;

// hi:lo = a * m (32 x 32 -> 64 bits per lane). The ISAs multiply the even lanes only (pmuludq): the odd
// lanes go through a 32-bit shift, and the halves are blended back.
FASTNN_INLINE void mulhilo(U32Vec a, uint32_t m, U32Vec& hi, U32Vec& lo) {
#if defined(FASTNN_ISA_avx512)
  const __m512i av = reinterpret_cast<const __m512i&>(a), mv = _mm512_set1_epi32(int(m));
  const __m512i even = _mm512_mul_epu32(av, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);
  const __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  const __m512i l = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = reinterpret_cast<const U32Vec&>(h), lo = reinterpret_cast<const U32Vec&>(l);
#elif defined(FASTNN_ISA_avx2)
  const __m256i av = reinterpret_cast<const __m256i&>(a), mv = _mm256_set1_epi32(int(m));
  const __m256i even = _mm256_mul_epu32(av, mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  const __m256i l = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = reinterpret_cast<const U32Vec&>(h), lo = reinterpret_cast<const U32Vec&>(l);
#elif defined(__SSE2__) && FASTNN_VEC_BYTES == 16
  const __m128i av = reinterpret_cast<const __m128i&>(a), mv = _mm_set1_epi32(int(m));
  const __m128i even = _mm_mul_epu32(av, mv), odd = _mm_mul_epu32(_mm_srli_epi64(av, 32), mv);
  const __m128i low = _mm_set1_epi64x(0xffffffff);
  const __m128i h = _mm_or_si128(_mm_srli_epi64(even, 32), _mm_andnot_si128(low, odd));
  const __m128i l = _mm_or_si128(_mm_and_si128(even, low), _mm_slli_epi64(odd, 32));
  hi = reinterpret_cast<const U32Vec&>(h), lo = reinterpret_cast<const U32Vec&>(l);
#else
  for (int64_t i = 0; i < kU32Lanes; ++i) {
    const uint64_t p = uint64_t(a[i]) * m;
    hi[i] = uint32_t(p >> 32), lo[i] = uint32_t(p);
  }
#endif
}

// c = Philox4x32-10(c, key (k0, k1)), lane by lane.
FASTNN_INLINE void philox4x32_10(U32Vec c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    U32Vec hi0, lo0, hi1, lo1;
    mulhilo(c[0], 0xD2511F53u, hi0, lo0);
    mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
    const U32Vec n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0, c[1] = lo1, c[2] = n2, c[3] = lo0;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
}

// The keep mask of the dropout for queries q0 .. q0 + kU32Lanes - 1 (one per lane) and the 4 keys
// 4 * g .. 4 * g + 3 of head b: keep[u] lane l is all ones when key 4 * g + u of query q0 + l survives.
FASTNN_INLINE void dropout_keep4(uint64_t seed, uint32_t offset, uint32_t threshold, int64_t b, int64_t q0,
                                 int64_t g, I32Vec keep[4]) {
  U32Vec c[4];
  for (int64_t l = 0; l < kU32Lanes; ++l) c[1][l] = uint32_t(q0 + l);
  c[0] = U32Vec{} + uint32_t(g), c[2] = U32Vec{} + uint32_t(b), c[3] = U32Vec{} + offset;
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  for (int u = 0; u < 4; ++u) keep[u] = c[u] >= threshold;
}

}  // namespace fastnn::cpu::FASTNN_ISA
