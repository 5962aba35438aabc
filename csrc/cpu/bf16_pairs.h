// bfloat16 pair panels for the AVX512-BF16 dot product (vdpbf16ps): packing with the range check that keeps
// the instruction's results equal to IEEE float32 arithmetic (see gemm_bf16.cpp), and the MR x NR tile
// kernel. Only for the avx512bf16 unit (compiled with -mavx512bf16).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstring>

#include "cpu/gemm_kernel.h"
#include "cpu/half.h"
#include "cpu/simd.h"

#if !defined(FASTNN_ISA_avx512bf16)
#error "cpu/bf16_pairs.h is for the avx512bf16 unit"
#endif

namespace fastnn::cpu::FASTNN_ISA {

// |h| (bits) zero, or with a biased exponent in [72, 190): 2^-55 <= |x| < 2^63.
constexpr uint16_t kLowBits = 72 << 7, kRangeBits = (190 - 72) << 7;
FASTNN_INLINE bool in_range(uint16_t h) {
  const uint16_t t = h & 0x7fff;
  return t == 0 || uint16_t(t - kLowBits) < kRangeBits;
}

// Lanes of v (32 bf16) outside the range.
FASTNN_INLINE __mmask32 out_of_range(__m512i v) {
  const __m512i t = _mm512_and_si512(v, _mm512_set1_epi16(0x7fff));
  return _mm512_test_epi16_mask(t, t) &
         _mm512_cmp_epu16_mask(_mm512_sub_epi16(t, _mm512_set1_epi16(kLowBits)), _mm512_set1_epi16(kRangeBits),
                               _MM_CMPINT_NLT);
}

using Word = uint32_t __attribute__((may_alias));

// The K pairs of `rows` (<= 16) rows of bf16, row r at src + r * ld, elements [k0, k0 + 32) clipped to kc
// (zero past it, so an odd kc ends with a zero-padded pair), transposed: pair p of row r goes to
// dst[p * dst_ld + r], for p in [0, 16) and r in [0, rows_out) (rows past `rows` zero). One 16 x 16
// transpose of 32-bit words in registers (two unpack stages within 128-bit lanes, two lane shuffles).
// Returns the lanes outside the dot product's range (see in_range).
template <int kRowsOut>
FASTNN_INLINE __mmask32 transpose_pairs(const uint16_t* src, int64_t ld, int64_t rows, int64_t k0, int64_t kc,
                                        Word* dst, int64_t dst_ld) {
  const __mmask32 m = kc - k0 >= 32 ? ~__mmask32(0) : __mmask32((1u << (kc - k0)) - 1);
  __m512i r[16], t[16];
  __mmask32 bad = 0;
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_maskz_loadu_epi16(m, src + i * ld + k0) : _mm512_setzero_si512();
    bad |= out_of_range(r[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: word 4L + j of rows 4i .. 4i + 3.
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i x_lo = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), x_hi = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee);
    const __m512i y_lo = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i y_hi = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
    const __m512i out[4] = {_mm512_shuffle_i32x4(x_lo, y_lo, 0x88), _mm512_shuffle_i32x4(x_lo, y_lo, 0xdd),
                            _mm512_shuffle_i32x4(x_hi, y_hi, 0x88), _mm512_shuffle_i32x4(x_hi, y_hi, 0xdd)};
#pragma GCC unroll 4
    for (int L = 0; L < 4; ++L) {  // the 16 words of pair 4L + j, one per row
      Word* d = dst + (4 * L + j) * dst_ld;
      if constexpr (kRowsOut == 16)
        _mm512_storeu_si512(d, out[L]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_castsi512_si256(out[L]));
    }
  }
  return bad;
}

// Panels of bf16 in K pairs, NRV vectors of 16 float32 lanes wide:
//   A panel: element (r, k) at [(k / 2 * kMR + r) * 2 + k % 2]: row r's pair k/2 is one 32-bit word;
//   B panel: element (k, c) at [(k / 2 * NR + c) * 2 + k % 2]: a vector load is 16 columns' pairs.
// An odd last k and rows / columns past the edge are zero.
template <int NRV> struct PairPanels {
  using P = uint16_t;
  // K blocks of 512: a packed B panel (512 x 32 bf16) is 32 KiB, as the float32 one of 256 x 32; and the
  // epilogue (C read and written) is paid per 512 K instead of 256 (1024^3: 209 GFLOP/s on one core, 204 with 256).
  static constexpr int64_t NR = NRV * 16, KC = 2 * kKC<float>;
  static constexpr int64_t depth(int64_t kc) { return round_up(kc, 2); }
  std::atomic<bool> outside{false};

  void flag(bool bad) {
    if (bad) outside.store(true, std::memory_order_relaxed);
  }
  bool usable() const { return !outside.load(std::memory_order_relaxed); }

  void pack_a(const Bf16* A, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, uint16_t* dst) {
    static_assert(kMR == 8, "pack_a and pack_rounded_at fill 8-row panels");
    if (a_cs == 1) {  // rows contiguous: 16 pairs of the 8 rows at a time, transposed in registers
      const uint16_t* src = reinterpret_cast<const uint16_t*>(A);
      Word* d = reinterpret_cast<Word*>(dst);
      __mmask32 bad = 0;
      // Whole groups of 16 pairs write 16 x 8 words; the last writes only the pairs the panel has.
      int64_t k0 = 0;
      for (; k0 + 32 <= kc; k0 += 32) bad |= transpose_pairs<kMR>(src, a_rs, rows, k0, kc, d + k0 / 2 * kMR, kMR);
      if (k0 < kc) {
        alignas(64) Word tail[16 * kMR];
        bad |= transpose_pairs<kMR>(src, a_rs, rows, k0, kc, tail, kMR);
        std::memcpy(d + k0 / 2 * kMR, tail, sizeof(Word) * kMR * ((kc - k0 + 1) / 2));
      }
      flag(bad != 0);
      return;
    }
    pack_scalar(A, a_rs, a_cs, rows, kc, kMR, dst);
  }

  void pack_b(const Bf16* B, int64_t b_rs, int64_t b_cs, int64_t kc, int64_t cols, uint16_t* dst) {
    if (b_cs == 1) {  // rows contiguous: two rows' 32-column (or fewer) slices interleaved into pairs
      __mmask32 bad = 0;
      const __mmask32 m = cols >= 32 ? ~__mmask32(0) : __mmask32((1u << cols) - 1);  // cols <= NR
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      for (int64_t k = 0; k < kc; k += 2) {
        const __m512i r0 = _mm512_maskz_loadu_epi16(m, B + k * b_rs);
        const __m512i r1 = k + 1 < kc ? _mm512_maskz_loadu_epi16(m, B + (k + 1) * b_rs) : _mm512_setzero_si512();
        bad |= out_of_range(r0) | out_of_range(r1);
        uint16_t* d = dst + k / 2 * NR * 2;
        _mm512_store_si512(d, _mm512_permutex2var_epi16(r0, lo, r1));  // columns 0-15
        if constexpr (NRV == 2) _mm512_store_si512(d + 32, _mm512_permutex2var_epi16(r0, hi, r1));  // 16-31
      }
      flag(bad != 0);
      return;
    }
    if (b_rs == 1) {  // columns contiguous (x @ w.T): 16 columns x 16 pairs at a time, transposed
      const uint16_t* src = reinterpret_cast<const uint16_t*>(B);
      Word* d = reinterpret_cast<Word*>(dst);
      __mmask32 bad = 0;
      for (int64_t c0 = 0; c0 < NR; c0 += 16) {
        const int64_t n = std::clamp<int64_t>(cols - c0, 0, 16);
        int64_t k0 = 0;
        for (; k0 + 32 <= kc; k0 += 32)
          bad |= transpose_pairs<16>(src + c0 * b_cs, b_cs, n, k0, kc, d + k0 / 2 * NR + c0, NR);
        if (k0 < kc) {
          alignas(64) Word tail[16 * 16];
          bad |= transpose_pairs<16>(src + c0 * b_cs, b_cs, n, k0, kc, tail, 16);
          for (int64_t p = 0; p < (kc - k0 + 1) / 2; ++p)
            std::memcpy(d + (k0 / 2 + p) * NR + c0, tail + p * 16, sizeof(Word) * 16);
        }
      }
      flag(bad != 0);
      return;
    }
    pack_scalar(B, b_cs, b_rs, cols, kc, NR, dst);  // any other strides
  }

  // Element (r, k) = src[r * r_stride + k * k_stride] for r < n of a panel `width` wide (rows of an A panel,
  // columns of a B panel) to dst[(k / 2 * width + r) * 2 + k % 2]; rows past n and an odd last k zero.
  void pack_scalar(const Bf16* src, int64_t r_stride, int64_t k_stride, int64_t n, int64_t kc, int64_t width,
                   uint16_t* dst) {
    if (n < width || kc % 2) std::memset(dst, 0, sizeof(uint16_t) * width * depth(kc));
    bool bad = false;
    for (int64_t r = 0; r < n; ++r) {
      const Bf16* s = src + r * r_stride;
      for (int64_t k = 0; k < kc; ++k) {
        const uint16_t h = s[k * k_stride].bits;
        bad |= !in_range(h);
        dst[(k / 2 * width + r) * 2 + k % 2] = h;
      }
    }
    flag(bad);
  }

  // C tile (=|+=) A panel * B panel over kc (packed panels only: a_rs, a_cs unused).
  FASTNN_INLINE void kernel(int64_t kc, const uint16_t* FASTNN_RESTRICT a, int64_t, int64_t,
                            const uint16_t* FASTNN_RESTRICT b, float* c, int64_t ldc, int64_t mr, int64_t nr,
                            bool accumulate, const float* bias, bool relu) {
    for (int64_t i = 0; i < mr; ++i)
      for (int v = 0; v < NRV; ++v) __builtin_prefetch(c + i * ldc + v * 16, 1);
    __m512 acc[kMR][NRV];
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) acc[i][v] = _mm512_setzero_ps();
    const Word* aw = reinterpret_cast<const Word*>(a);
    const int64_t pairs = (kc + 1) / 2;
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh bv[NRV];
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) bv[v] = (__m512bh)_mm512_load_si512(b + (p * NR + v * 16) * 2);
#pragma GCC unroll 16
      for (int i = 0; i < kMR; ++i) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(int(aw[p * kMR + i]));
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
      }
    }
    Vec<float> out[kMR][NRV];
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) out[i][v] = (Vec<float>)acc[i][v];
    store_tile<float, NRV>(out, c, ldc, mr, nr, accumulate, bias, relu);
  }
};


// The probabilities P and score gradients dS of attention are rounded to bfloat16 for the dot product times
// kOperandScale = 2^32 (the products are scaled back by kOperandUnscale): P in [0, 1] becomes at most 2^32
// and, for any nonzero float32 P (>= 2^-149), at least 2^-117, a normal bfloat16 the instruction does not
// read as zero. A scaled value of 2^kScaledMaxExp or more (or NaN) is out of range: its products with
// operands below 2^63 could overflow before the float32 sum would; the caller then gives up.
constexpr float kOperandScale = 4294967296.0f, kOperandUnscale = 1.0f / 4294967296.0f;
constexpr int kScaledMaxExp = 47;

// A float32 matrix X of kc rows and m columns (row stride ld) as the A operand X^T (m rows, K = kc), times
// kOperandScale, rounded to bfloat16 and packed in K pairs as PairPanels::pack_a lays them out (panels of
// kMR = 8 rows), for the rows [0, m) of X^T, m a multiple of 16 (X must have those columns: their values
// only reach rows the kernel does not store). Returns false when a value of the first `valid` columns is
// out of range (see kScaledMaxExp).
inline bool pack_rounded_at(const float* X, int64_t ld, int64_t m, int64_t valid, int64_t kc, uint16_t* dst) {
  const int64_t kd = round_up(kc, 2);
  Word* d = reinterpret_cast<Word*>(dst);
  const __m512 mul = _mm512_set1_ps(kOperandScale);
  const __m512i limit = _mm512_set1_epi32((127 + kScaledMaxExp) << 7);  // on the rounded bits
  __mmask16 bad = 0;
  for (int64_t i = 0; i < m; i += 16) {
    Word* p0 = d + i * (kd / 2);  // the panels of rows i .. i + 7 and i + 8 .. i + 15 of X^T
    Word* p1 = p0 + kMR * (kd / 2);
    const __mmask16 cols = valid - i >= 16 ? __mmask16(0xffff) : valid > i ? __mmask16((1u << (valid - i)) - 1) : 0;
    for (int64_t k = 0; k < kc; k += 2) {
      const __m512i lo = round_bf16(_mm512_mul_ps(_mm512_loadu_ps(X + k * ld + i), mul));
      const __m512i hi = k + 1 < kc ? round_bf16(_mm512_mul_ps(_mm512_loadu_ps(X + (k + 1) * ld + i), mul))
                                    : _mm512_setzero_si512();
      const __m512i abs_mask = _mm512_set1_epi32(0x7fff);
      bad |= _mm512_mask_cmpge_epi32_mask(cols, _mm512_and_si512(lo, abs_mask), limit) |
             _mm512_mask_cmpge_epi32_mask(cols, _mm512_and_si512(hi, abs_mask), limit);
      const __m512i w = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));  // (k, k + 1) per row of X^T
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0 + k / 2 * kMR), _mm512_castsi512_si256(w));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1 + k / 2 * kMR), _mm512_extracti64x4_epi64(w, 1));
    }
  }
  return bad == 0;
}

// Whole operands in pair panels, and the product of packed operands (small in-cache tiles: attention).
template <int NRV>
void pack_a_all(PairPanels<NRV>& pn, const Bf16* A, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, uint16_t* dst) {
  for (int64_t i = 0; i < rows; i += kMR)
    pn.pack_a(A + i * a_rs, a_rs, a_cs, std::min<int64_t>(kMR, rows - i), kc, dst + i * PairPanels<NRV>::depth(kc));
}

template <int NRV>
void pack_b_all(PairPanels<NRV>& pn, const Bf16* B, int64_t b_rs, int64_t b_cs, int64_t kc, int64_t cols, uint16_t* dst) {
  constexpr int64_t NR = PairPanels<NRV>::NR;
  for (int64_t j = 0; j < cols; j += NR)
    pn.pack_b(B + j * b_cs, b_rs, b_cs, kc, std::min(NR, cols - j), dst + j * PairPanels<NRV>::depth(kc));
}

// C[rows x cols] (=|+=) Ap * Bp over kc, both packed whole (pack_a_all / pack_rounded_at, pack_b_all).
template <int NRV>
void gemm_pairs(PairPanels<NRV>& pn, const uint16_t* Ap, const uint16_t* Bp, int64_t rows, int64_t cols, int64_t kc,
                float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = PairPanels<NRV>::NR;
  const int64_t kd = PairPanels<NRV>::depth(kc);
  for (int64_t j = 0; j < cols; j += NR)
    for (int64_t i = 0; i < rows; i += kMR)
      pn.kernel(kc, Ap + i * kd, 1, kMR, Bp + j * kd, C + i * ldc + j, ldc, std::min<int64_t>(kMR, rows - i),
                std::min(NR, cols - j), accumulate, nullptr, false);
}

}  // namespace fastnn::cpu::FASTNN_ISA
