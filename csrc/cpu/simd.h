// Vector primitives for the per-ISA kernel units. Built on GCC/Clang vector extensions: the width follows
// the ISA the unit is compiled for (FASTNN_ISA_*), so every op is written once and compiled three times.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(FASTNN_ISA_avx512)
#define FASTNN_VEC_BYTES 64
#elif defined(FASTNN_ISA_avx2)
#define FASTNN_VEC_BYTES 32
#else
#define FASTNN_VEC_BYTES 16
#endif

#define FASTNN_RESTRICT __restrict__
#define FASTNN_INLINE inline __attribute__((always_inline))

namespace fastnn::cpu::FASTNN_ISA {

template <typename T> struct VecTraits;
// V: the register type (naturally aligned); U: the same vector at element alignment, for unaligned
// loads and stores straight from/to memory (may_alias: it reads arrays of T).
template <> struct VecTraits<float> {
  typedef float V __attribute__((vector_size(FASTNN_VEC_BYTES)));
  typedef float U __attribute__((vector_size(FASTNN_VEC_BYTES), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(FASTNN_VEC_BYTES)));
};
template <> struct VecTraits<double> {
  typedef double V __attribute__((vector_size(FASTNN_VEC_BYTES)));
  typedef double U __attribute__((vector_size(FASTNN_VEC_BYTES), aligned(8), may_alias));
  typedef int64_t I __attribute__((vector_size(FASTNN_VEC_BYTES)));
};

template <typename T> using Vec = typename VecTraits<T>::V;
template <typename T> using IVec = typename VecTraits<T>::I;
template <typename T> constexpr int64_t kLanes = FASTNN_VEC_BYTES / sizeof(T);

// Broadcast. (x - 0 is an exact identity, so it folds to a plain broadcast; 0 + x would not: -0.)
template <typename T> FASTNN_INLINE Vec<T> vset(T x) { return x - Vec<T>{}; }
template <typename T> FASTNN_INLINE Vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VecTraits<T>::U*>(p);
}
template <typename T> FASTNN_INLINE void vstore(T* p, Vec<T> v) { *reinterpret_cast<typename VecTraits<T>::U*>(p) = v; }
// Partial load of the first n (0 <= n <= lanes) elements; the rest of the vector is `fill`. Partial store
// of the first n lanes. Memory past the n elements is never touched: masked instructions on AVX-512 and
// AVX2 (masked-off lanes do not fault), element by element in the generic path.
#if defined(FASTNN_ISA_avx512)
FASTNN_INLINE Vec<float> vload_part(const float* p, int64_t n, float fill) {
  const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(fill), __mmask16((1u << n) - 1), p);
  return reinterpret_cast<const Vec<float>&>(v);
}
FASTNN_INLINE Vec<double> vload_part(const double* p, int64_t n, double fill) {
  const __m512d v = _mm512_mask_loadu_pd(_mm512_set1_pd(fill), __mmask8((1u << n) - 1), p);
  return reinterpret_cast<const Vec<double>&>(v);
}
FASTNN_INLINE void vstore_part(float* p, Vec<float> v, int64_t n) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), reinterpret_cast<const __m512&>(v));
}
FASTNN_INLINE void vstore_part(double* p, Vec<double> v, int64_t n) {
  _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), reinterpret_cast<const __m512d&>(v));
}
#elif defined(FASTNN_ISA_avx2)
// Lane i of the mask is all ones when i < n.
FASTNN_INLINE __m256i lanes_below32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTNN_INLINE __m256i lanes_below64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
FASTNN_INLINE Vec<float> vload_part(const float* p, int64_t n, float fill) {
  const __m256i m = lanes_below32(n);
  const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  return reinterpret_cast<const Vec<float>&>(v);
}
FASTNN_INLINE Vec<double> vload_part(const double* p, int64_t n, double fill) {
  const __m256i m = lanes_below64(n);
  const __m256d v = _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  return reinterpret_cast<const Vec<double>&>(v);
}
FASTNN_INLINE void vstore_part(float* p, Vec<float> v, int64_t n) {
  _mm256_maskstore_ps(p, lanes_below32(n), reinterpret_cast<const __m256&>(v));
}
FASTNN_INLINE void vstore_part(double* p, Vec<double> v, int64_t n) {
  _mm256_maskstore_pd(p, lanes_below64(n), reinterpret_cast<const __m256d&>(v));
}
#else
template <typename T> FASTNN_INLINE Vec<T> vload_part(const T* p, int64_t n, T fill) {
  Vec<T> v = vset<T>(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <typename T> FASTNN_INLINE void vstore_part(T* p, Vec<T> v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}
#endif
// Non-temporal (cache-bypassing) store of a full vector to an address aligned to the vector size, and the
// fence that orders such stores before the kernel returns. Plain stores where the ISA has none.
FASTNN_INLINE void vstore_stream(float* p, Vec<float> v) {
#if defined(FASTNN_ISA_avx512)
  _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#elif defined(FASTNN_ISA_avx2)
  _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
#elif defined(__SSE2__)
  _mm_stream_ps(p, reinterpret_cast<__m128&>(v));
#else
  vstore(p, v);
#endif
}
FASTNN_INLINE void vstore_stream(double* p, Vec<double> v) {
#if defined(FASTNN_ISA_avx512)
  _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
#elif defined(FASTNN_ISA_avx2)
  _mm256_stream_pd(p, reinterpret_cast<__m256d&>(v));
#elif defined(__SSE2__)
  _mm_stream_pd(p, reinterpret_cast<__m128d&>(v));
#else
  vstore(p, v);
#endif
}
// Results at least this large (bytes) are written with the non-temporal stores above: well past L2, a
// good part of the L3.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
FASTNN_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The helpers below take the vector type itself (V = Vec<float> or Vec<double>): Vec<T> is not deducible.
// max/min that keep a NaN in `a` but drop one in `b` (a < b is false for NaN): one instruction (vmaxps
// semantics), for the running maxima of softmax and attention, whose callers carry a NaN by other means
// (said at each use). An op whose result is the maximum itself must propagate NaN from both sides (Adam).
template <typename V> FASTNN_INLINE V vmax(V a, V b) { return a < b ? b : a; }
template <typename V> FASTNN_INLINE V vmin(V a, V b) { return a > b ? b : a; }
// relu that propagates NaN (NaN < 0 is false), as np.maximum(x, 0) does.
template <typename V> FASTNN_INLINE V vrelu(V a) { return a < V{} ? V{} : a; }

template <typename V> using Elem = std::remove_cv_t<std::remove_reference_t<decltype(V{}[0])>>;
// Horizontal sum / max by halving (log2(lanes) vector steps instead of a serial chain over the lanes).
template <typename V> FASTNN_INLINE Elem<V> hsum(V v) {
  using E = Elem<V>;
  constexpr size_t n = sizeof(V) / sizeof(E);
  E buf[n];
  std::memcpy(buf, &v, sizeof(V));
  for (size_t h = n / 2; h >= 1; h /= 2)
    for (size_t i = 0; i < h; ++i) buf[i] += buf[i + h];
  return buf[0];
}
// hmax keeps a NaN only where it sits in the lane that wins every step (like vmax); callers carry NaN apart.
template <typename V> FASTNN_INLINE Elem<V> hmax(V v) {
  using E = Elem<V>;
  constexpr size_t n = sizeof(V) / sizeof(E);
  E buf[n];
  std::memcpy(buf, &v, sizeof(V));
  for (size_t h = n / 2; h >= 1; h /= 2)
    for (size_t i = 0; i < h; ++i) buf[i] = (buf[i] < buf[i + h]) ? buf[i + h] : buf[i];
  return buf[0];
}

// Scalar vmax: keeps a NaN in `a`, drops one in `b`.
template <typename T> FASTNN_INLINE T smax(T a, T b) { return a < b ? b : a; }

// exp(r) for |r| <= ln2/2, the core of vexp below. float: degree 6, fitted for relative error (2e-9 before
// rounding; about 1 ulp in float arithmetic); double: the Taylor polynomial of degree 13 (truncation error
// below half an ulp).
FASTNN_INLINE Vec<float> exp_poly(Vec<float> r) {
  Vec<float> p = vset<float>(1.3836835e-3f);
  p = p * r + 8.3748242e-3f;
  p = p * r + 4.1668225e-2f;
  p = p * r + 1.6666420e-1f;
  p = p * r + 4.9999991e-1f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}
FASTNN_INLINE Vec<double> exp_poly(Vec<double> r) {
  Vec<double> p = vset<double>(1.0 / 6227020800.0);
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

// exp(x): Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, exp_poly(r), then scaled by 2^n with a
// single rounding, so results in the subnormal range are rounded, not flushed. Every path: exp(NaN) = NaN,
// exp(+inf) = inf, exp(-inf) = 0, and x is clamped first to [lo, hi] (NaN kept), a range a little wider than
// the one where exp is a nonzero finite number: below lo the scaled result rounds to 0, above hi it
// overflows to inf by itself, so no select after the scaling is needed. Measured error (tests/test_exp.py):
// float at most 1 ulp, double at most 1 ulp, over the whole input range, the same on every path.
#if defined(FASTNN_ISA_avx512)
// vmin/vmax return their second operand when either is NaN: x's NaN is kept. scalef(p, n) with p in
// [0.7, 1.5] scales with one rounding, into the subnormal range, to 0 and to inf.
FASTNN_INLINE Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  const __m512 xm = _mm512_max_ps(_mm512_set1_ps(-104.0f),
                                  _mm512_min_ps(_mm512_set1_ps(89.0f), reinterpret_cast<const __m512&>(x)));
  const V xc = reinterpret_cast<const V&>(xm);
  const V xl = xc * 1.44269504088896341f;
  const __m512 nm = _mm512_roundscale_ps(reinterpret_cast<const __m512&>(xl), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V n = reinterpret_cast<const V&>(nm);
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V p = exp_poly(r);
  const __m512 y = _mm512_scalef_ps(reinterpret_cast<const __m512&>(p), nm);
  return reinterpret_cast<const V&>(y);
}

FASTNN_INLINE Vec<double> vexp(Vec<double> x) {
  using V = Vec<double>;
  const __m512d xm = _mm512_max_pd(_mm512_set1_pd(-746.0),
                                   _mm512_min_pd(_mm512_set1_pd(710.0), reinterpret_cast<const __m512d&>(x)));
  const V xc = reinterpret_cast<const V&>(xm);
  const V xl = xc * 1.4426950408889634074;
  const __m512d nm = _mm512_roundscale_pd(reinterpret_cast<const __m512d&>(xl), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V n = reinterpret_cast<const V&>(nm);
  V r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  const V p = exp_poly(r);
  const __m512d y = _mm512_scalef_pd(reinterpret_cast<const __m512d&>(p), nm);
  return reinterpret_cast<const V&>(y);
}
#else
// Without vscalef, 2^n (n in [-150, 128] for float, [-1076, 1024] for double) is applied in two factors
// that are each normal: 2^n1 with n1 = n >> 1 (exact: added to p's exponent field, which stays normal) and
// then a multiply by 2^(n - n1), the one rounding.
#if defined(FASTNN_ISA_avx2)
FASTNN_INLINE Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  // vmin/vmax return their second operand when either is NaN: x's NaN is kept.
  const __m256 xm = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f),
                                                                         reinterpret_cast<const __m256&>(x)));
  const V xc = reinterpret_cast<const V&>(xm);
  const V xl = xc * 1.44269504088896341f;
  const __m256 nm = _mm256_round_ps(reinterpret_cast<const __m256&>(xl), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V n = reinterpret_cast<const V&>(nm);
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V p = exp_poly(r);
  const __m256i ni = _mm256_cvtps_epi32(nm);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i p1 = _mm256_add_epi32(reinterpret_cast<const __m256i&>(p), _mm256_slli_epi32(n1, 23));
  const __m256i s2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, n1), _mm256_set1_epi32(127)), 23);
  return reinterpret_cast<const V&>(p1) * reinterpret_cast<const V&>(s2);
}
#else
FASTNN_INLINE Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  using I = IVec<float>;
  const V hi = vset<float>(89.0f), lo = vset<float>(-104.0f);
  V xc = x > hi ? hi : x;  // NaN kept (both comparisons are false for it)
  xc = xc < lo ? lo : xc;
  const V magic = vset<float>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V t = xc * 1.44269504088896341f + magic;
  V n = t - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V p = exp_poly(r);
  I tb, mb, pb;  // n as an integer: the low bits of t minus those of the magic number
  std::memcpy(&tb, &t, sizeof(V));
  std::memcpy(&mb, &magic, sizeof(V));
  std::memcpy(&pb, &p, sizeof(V));
  const I ni = tb - mb, n1 = ni >> 1;
  const I p1 = pb + (n1 << 23), e2 = ((ni - n1) + 127) << 23;
  V y1, s2;
  std::memcpy(&y1, &p1, sizeof(V));
  std::memcpy(&s2, &e2, sizeof(V));
  // A NaN x gives a garbage n, and p's exponent bits plus n1 could turn its NaN into a number: NaN in,
  // NaN out by this select.
  return x != x ? x : y1 * s2;
}

#endif

FASTNN_INLINE Vec<double> vexp(Vec<double> x) {
  using V = Vec<double>;
  using I = IVec<double>;
  const V hi = vset<double>(710.0), lo = vset<double>(-746.0);
  V xc = x > hi ? hi : x;  // NaN kept (both comparisons are false for it)
  xc = xc < lo ? lo : xc;
  const V magic = vset<double>(6755399441055744.0);  // 1.5 * 2^52
  V t = xc * 1.4426950408889634074 + magic;
  V n = t - magic;
  V r = xc - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  const V p = exp_poly(r);
  I tb, mb, pb;
  std::memcpy(&tb, &t, sizeof(V));
  std::memcpy(&mb, &magic, sizeof(V));
  std::memcpy(&pb, &p, sizeof(V));
  const I ni = tb - mb, n1 = ni >> 1;
  const I p1 = pb + (n1 << 52), e2 = ((ni - n1) + 1023) << 52;
  V y1, s2;
  std::memcpy(&y1, &p1, sizeof(V));
  std::memcpy(&s2, &e2, sizeof(V));
  // A NaN x gives a garbage n, and p's exponent bits plus n1 could turn its NaN into a number: NaN in,
  // NaN out by this select.
  return x != x ? x : y1 * s2;
}
#endif

}  // namespace fastnn::cpu::FASTNN_ISA
