// The pieces of the flash-style attention forward (sdpa.cpp) that do not depend on how the two products
// are computed: block sizes, the causal rule and masks on a scores tile, dropout on the probabilities, the
// online softmax down the columns of S^T and the final normalisation. Shared by the float kernels of every
// ISA unit and the bfloat16 dot-product kernel of the avx512bf16 unit (sdpa_bf16.cpp).
#pragma once
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/gemm_kernel.h"
#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

constexpr int64_t kBq = 8 * kMR;  // queries per block: whole A panels (backward); a multiple of NR and of the lanes
template <typename T> constexpr int64_t kBc = 4 * kNR<T>;  // keys per block in the backward: whole B panels
constexpr int64_t kFc = 16 * kMR;  // keys per block in the forward: whole A panels of K

static_assert(kFc % 4 == 0, "dropout: forward key tiles must start at multiples of 4");

// Zeroes the lanes of kU32Lanes consecutive values where keep is 0.
FASTNN_INLINE void drop_lanes(float* p, I32Vec keep) { vstore(p, keep ? vload(p) : Vec<float>{}); }
FASTNN_INLINE void drop_lanes(double* p, I32Vec keep) {
  typedef int32_t Half __attribute__((vector_size(FASTNN_VEC_BYTES / 2)));
  Half h[2];
  std::memcpy(h, &keep, sizeof keep);
  for (int k = 0; k < 2; ++k) {
    const IVec<double> m = __builtin_convertvector(h[k], IVec<double>);
    double* q = p + k * kLanes<double>;
    vstore(q, m ? vload(q) : Vec<double>{});
  }
}

// The dropout keep masks of a tile of head b, queries q0 .. q0 + nq and keys k0 .. k0 + bc (both rounded up:
// to kU32Lanes and to 4), one Philox call per kU32Lanes queries x 4 keys: f(i, j, keep), keep[u] the mask of
// queries q0 + i .. (one per lane) for key k0 + j + u.
template <typename T, typename F>
FASTNN_INLINE void for_keep_groups(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t nq, int64_t k0, int64_t bc,
                                   F f) {
  for (int64_t i = 0; i < nq; i += kU32Lanes)
    for (int64_t j = 0; j < bc; j += 4) {
      I32Vec keep[4];
      dropout_keep4(a.seed, a.offset, a.drop_threshold, b, q0 + i, (k0 + j) / 4, keep);
      f(i, j, keep);
    }
}

// Dropout on the P^T tile of keys k0 .. k0 + bc (rows, stride ld) and queries q0 .. q0 + nq (columns,
// nq a multiple of kU32Lanes) of head b.
template <typename T>
void dropout_tile_t(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t nq, int64_t k0, int64_t bc, T* St,
                    int64_t ld) {
  for_keep_groups(a, b, q0, nq, k0, bc, [&](int64_t i, int64_t j, const I32Vec(&keep)[4]) {
    for (int64_t u = 0; u < 4 && j + u < bc; ++u) drop_lanes(St + (j + u) * ld + i, keep[u]);
  });
}

// Applies the causal rule and the mask to a scores tile of queries q0.. (bq of them) and keys k0.. (bc) of
// head b, whose element (i, j) is s[i * sq + j * sk]: a float mask is added, and so is -inf to a disallowed
// score, as PyTorch's additive mask does (-inf, or NaN where the score is NaN or +inf: tests/test_nonfinite.py).
// (The scale is already in the scores: sdpa.cpp scales Q when it packs it, sdpa_bf16.cpp the scores.)
template <typename T>
void mask_scores(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t bq, int64_t k0, int64_t bc, T* s, int64_t sq,
                 int64_t sk) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (!a.causal && !a.fmask && !a.bmask) return;
  for (int64_t i = 0; i < bq; ++i) {
    const int64_t qi = q0 + i;
    T* si = s + i * sq;
    const int64_t jend = a.causal ? std::max<int64_t>(0, std::min(bc, qi - k0 + 1)) : bc;
    for (int64_t j = jend; j < bc; ++j) si[j * sk] += ninf;
    if (a.fmask || a.bmask) {
      const int64_t mo = a.m_off[b] + qi * a.m_rs + k0 * a.m_cs;
      if (a.fmask) {
        for (int64_t j = 0; j < jend; ++j) si[j * sk] += a.fmask[mo + j * a.m_cs];
      } else {
        for (int64_t j = 0; j < jend; ++j)
          if (!a.bmask[mo + j * a.m_cs]) si[j * sk] += ninf;
      }
    }
  }
}

// Online softmax down the columns of a scores tile S^T (bc keys x bq queries, row stride ld), W queries at
// a time: S^T becomes P^T = exp(s - m_new) in place; l and the O rows are rescaled by alpha = exp(m_old -
// m_new) (rescale_rows). m, l, alpha: per query, padded to whole vectors.
template <typename T>
void online_softmax_tile(T* St, int64_t ld, int64_t bq, int64_t bc, T* m, T* l, T* alpha) {
  constexpr int64_t W = kLanes<T>;
  using V = Vec<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t bq_lanes = round_up(bq, W);
  for (int64_t i = 0; i < bq_lanes; i += W) {
    const V m_old = vload(m + i);
    // Column max in four independent chains (a single one is latency-bound); NaNs are collected
    // apart and propagate: a NaN score makes the row NaN.
    V mx[4] = {m_old, m_old, m_old, m_old};
    IVec<T> nan{};
    int64_t j = 0;
    for (; j + 4 <= bc; j += 4)
      for (int u = 0; u < 4; ++u) {
        const V v = vload(St + (j + u) * ld + i);
        mx[u] = vmax(mx[u], v);  // may drop a NaN v: collected in `nan` instead (one cmp, no blend)
        nan |= v != v;
      }
    for (; j < bc; ++j) {
      const V v = vload(St + j * ld + i);
      mx[0] = vmax(mx[0], v);
      nan |= v != v;
    }
    V m_new = vmax(vmax(mx[0], mx[1]), vmax(mx[2], mx[3]));
    m_new = nan ? vset<T>(std::numeric_limits<T>::quiet_NaN()) : m_new;
    // Nothing allowed yet: P = 0, nothing rescaled. (NaN == -inf is false: a NaN m_new goes on into P.)
    const auto none = m_new == vset<T>(ninf);
    const V m_sub = none ? V{} : m_new;
    const V al = none ? vset<T>(T(1)) : vexp(m_old - m_new);  // exp(-inf) = 0 on the first allowed block
    V sum{};
    for (int64_t j = 0; j < bc; ++j) {
      const V e = vexp(vload(St + j * ld + i) - m_sub);
      vstore(St + j * ld + i, e);
      sum += e;
    }
    vstore(l + i, vload(l + i) * al + sum);
    vstore(m + i, m_new);
    vstore(alpha + i, al);
  }
}

// O rows (row stride ldo) *= alpha.
template <typename T> void rescale_rows(T* Ob, int64_t ldo, int64_t bq, const T* alpha) {
  constexpr int64_t W = kLanes<T>;
  using V = Vec<T>;
  for (int64_t i = 0; i < bq; ++i) {
    if (alpha[i] == T(1)) continue;  // a NaN alpha is not 1: it rescales O to NaN
    T* o = Ob + i * ldo;
    const V av = vset<T>(alpha[i]);
    for (int64_t c = 0; c < ldo; c += W) vstore(o + c, vload(o + c) * av);
  }
}

// The output rows of queries q0 .. q0 + bq of head b: O / l (zeros for a row with no allowed key), and lse.
template <typename T>
void finish_rows(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t bq, const T* Ob, int64_t ldo, const T* m,
                 const T* l, T o_scale = T(1)) {  // o_scale: Ob holds o_scale^-1 times the sums (sdpa_bf16.cpp)
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t Ev = a.Ev;
  T* out = a.O + b * a.o_bs + q0 * Ev;
  for (int64_t i = 0; i < bq; ++i) {
    // No allowed key (l == 0): zeros, not NaN. A NaN score makes l NaN and the row NaN, as in the oracle.
    const bool empty = l[i] == T(0);
    const T inv = empty ? T(0) : (a.dropout ? T(a.keep_scale) : T(1)) / l[i] * o_scale;
    const T* o = Ob + i * ldo;
    for (int64_t c = 0; c < Ev; ++c) out[i * Ev + c] = empty ? T(0) : o[c] * inv;
    if (a.lse) a.lse[b * a.L + q0 + i] = empty ? ninf : m[i] + std::log(l[i]);
  }
}

// Z[i * ldz + j] = -1 (kept) or 0 (dropped): the keep mask of queries q0 .. q0 + bq and keys k0 .. k0 + bc of
// head b. Philox gives it transposed (queries in the lanes, 4 keys per call); each 128-bit block of the 4
// keep vectors is transposed with SSE2 unpacks into 4 rows of 4 keys.
template <typename T>
void dropout_keep_rows(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t bq, int64_t k0, int64_t bc, int32_t* Z,
                       int64_t ldz) {
  for_keep_groups(a, b, q0, bq, k0, bc, [&](int64_t i, int64_t j, const I32Vec(&keep)[4]) {
#if defined(__SSE2__)
    // Z rows are padded to whole groups of 4 keys and query rows up to a multiple of the lanes (ldz, and
    // the buffer's kBq rows): the 16-byte stores stay inside.
    for (int64_t blk = 0; blk < kU32Lanes / 4; ++blk) {
      __m128i r[4];
      for (int u = 0; u < 4; ++u) std::memcpy(&r[u], reinterpret_cast<const char*>(&keep[u]) + 16 * blk, 16);
      const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
      const __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
      int32_t* z = Z + (i + 4 * blk) * ldz + j;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(z), _mm_unpacklo_epi64(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(z + ldz), _mm_unpackhi_epi64(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(z + 2 * ldz), _mm_unpacklo_epi64(t1, t3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(z + 3 * ldz), _mm_unpackhi_epi64(t1, t3));
    }
#else
    for (int64_t l = 0; l < kU32Lanes; ++l)
      for (int u = 0; u < 4; ++u) Z[(i + l) * ldz + j + u] = keep[u][l];
#endif
  });
}

// The dropout factor keep_scale or 0 of W consecutive keys, from their keep mask.
FASTNN_INLINE Vec<float> keep_factor(const int32_t* z, Vec<float> ks) {
  I32Vec m;
  std::memcpy(&m, z, sizeof m);
  return m ? ks : Vec<float>{};
}
FASTNN_INLINE Vec<double> keep_factor(const int32_t* z, Vec<double> ks) {
  typedef int32_t Half __attribute__((vector_size(FASTNN_VEC_BYTES / 2)));
  Half h;
  std::memcpy(&h, z, sizeof h);
  return __builtin_convertvector(h, IVec<double>) ? ks : Vec<double>{};
}

// The backward's elementwise step on a tile of queries q0 .. q0 + bq and keys k0 .. k0 + bc of head b (row
// stride ld; lse and D of the tile's queries): scores -> P = exp(s - lse) (times the dropout factor Z / (1 - p))
// and dP -> dS = scale * P * (dP * Z - D). Z: scratch for the keep mask (row stride ld).
template <typename T>
void probs_and_score_grads(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t bq, int64_t k0, int64_t bc, T* P,
                           T* dP, int64_t ld, const T* lse, const T* D, int32_t* Z) {
  constexpr int64_t W = kLanes<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  if (a.dropout) dropout_keep_rows(a, b, q0, bq, k0, bc, Z, ld);
  for (int64_t i = 0; i < bq; ++i) {
    const T l = lse[i], di = D[i];
    T* pr = P + i * ld;
    T* dr = dP + i * ld;
    if (l == ninf) {  // a row with no allowed key has no gradient (a NaN lse is not -inf: NaN P below)
      for (int64_t j = 0; j < bc; ++j) pr[j] = dr[j] = T(0);
      continue;
    }
    const Vec<T> lv = vset<T>(l), dv = vset<T>(di), sv = vset<T>(a.scale);
    int64_t j = 0;
    if (a.dropout) {
      const int32_t* zr = Z + i * ld;
      const Vec<T> ksv = vset<T>(T(a.keep_scale));
      for (; j + W <= bc; j += W) {
        const Vec<T> pj = vexp(vload(pr + j) - lv), zj = keep_factor(zr + j, ksv);
        vstore(pr + j, pj * zj);
        vstore(dr + j, sv * pj * (vload(dr + j) * zj - dv));
      }
      for (; j < bc; ++j) {
        const T pj = std::exp(pr[j] - l), zj = zr[j] ? T(a.keep_scale) : T(0);
        pr[j] = pj * zj;
        dr[j] = a.scale * pj * (dr[j] * zj - di);
      }
      continue;
    }
    for (; j + W <= bc; j += W) {
      const Vec<T> pj = vexp(vload(pr + j) - lv);
      vstore(pr + j, pj);
      vstore(dr + j, sv * pj * (vload(dr + j) - dv));
    }
    if (j < bc) {  // the tail through the same vexp: P does not depend on a key's position in the tile
      const int64_t k = bc - j;
      const Vec<T> pj = vexp(vload_part(pr + j, k, T(0)) - lv);
      vstore_part(pr + j, pj, k);
      vstore_part(dr + j, sv * pj * (vload_part(dr + j, k, T(0)) - dv), k);
    }
  }
}

}  // namespace fastnn::cpu::FASTNN_ISA
