// bfloat16 / float16 <-> float32 over whole arrays, vectorized and threaded: the half-precision ops widen
// their operands to float32, run the float32 kernels (every sum and dot product in float32) and round the
// results back to nearest even. float16 uses the F16C instructions on avx2/avx512.
#include <algorithm>

#include "cpu/half.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

constexpr int64_t kConvertGrain = 1 << 16;

void widen_range(const uint16_t* FASTNN_RESTRICT s, float* FASTNN_RESTRICT d, int64_t b, int64_t e, bool bf16) {
  int64_t i = b;
  if (bf16) {
    for (; i < e; ++i) d[i] = bf16_to_f32(s[i]);  // a shift: the compiler vectorizes it
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

void narrow_range(const float* FASTNN_RESTRICT s, uint16_t* FASTNN_RESTRICT d, int64_t b, int64_t e, bool bf16) {
  int64_t i = b;
  if (bf16) {
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

}  // namespace

void half_widen(const uint16_t* src, float* dst, int64_t n, bool bf16) {
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { widen_range(src, dst, b, e, bf16); });
}

void half_narrow(const float* src, uint16_t* dst, int64_t n, bool bf16) {
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { narrow_range(src, dst, b, e, bf16); });
}

}  // namespace fastnn::cpu::FASTNN_ISA
