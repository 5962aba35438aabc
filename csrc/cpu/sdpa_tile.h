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

// Dropout on the P^T tile of keys k0 .. k0 + bc (rows, stride ld) and queries q0 .. q0 + nq (columns,
// nq a multiple of kU32Lanes) of head b.
template <typename T>
void dropout_tile_t(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t nq, int64_t k0, int64_t bc, T* St,
                    int64_t ld) {
  for (int64_t i = 0; i < nq; i += kU32Lanes)
    for (int64_t j = 0; j < bc; j += 4) {
      I32Vec keep[4];
      dropout_keep4(a.seed, a.offset, a.drop_threshold, b, q0 + i, (k0 + j) / 4, keep);
      for (int64_t u = 0; u < 4 && j + u < bc; ++u) drop_lanes(St + (j + u) * ld + i, keep[u]);
    }
}

// Applies the causal rule and the mask to a scores tile of queries q0.. (bq of them) and keys k0.. (bc) of
// head b, whose element (i, j) is s[i * sq + j * sk]: a float mask is added, and so is -inf to a disallowed
// score, as PyTorch's additive mask does (-inf, or NaN where the score is NaN or +inf: tests/test_nonfinite.py).
// (The scale is already in the scores: Q is scaled when it is packed.)
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
                 const T* l) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t Ev = a.Ev;
  T* out = a.O + b * a.o_bs + q0 * Ev;
  for (int64_t i = 0; i < bq; ++i) {
    // No allowed key (l == 0): zeros, not NaN. A NaN score makes l NaN and the row NaN, as in the oracle.
    const bool empty = l[i] == T(0);
    const T inv = empty ? T(0) : (a.dropout ? T(a.keep_scale) : T(1)) / l[i];
    const T* o = Ob + i * ldo;
    for (int64_t c = 0; c < Ev; ++c) out[i * Ev + c] = empty ? T(0) : o[c] * inv;
    if (a.lse) a.lse[b * a.L + q0 + i] = empty ? ninf : m[i] + std::log(l[i]);
  }
}

}  // namespace fastnn::cpu::FASTNN_ISA
