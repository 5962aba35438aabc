// Attention forward on bfloat16 query / key / value with the AVX512-BF16 dot product (avx512bf16 unit):
// sdpa.cpp's flash-style forward (transposed scores S^T = K Q^T, online softmax down the columns, O += P V)
// with both products on bf16 pair panels (bf16_pairs.h) and everything between them in float32: the scores
// are scaled in float32 after the product (Q is not rounded again), and only the probabilities are rounded
// to bfloat16 for P V (relative error 2^-9 each; PyTorch's CPU flash attention rounds them the same way).
// The operands are packed from the bf16 arrays themselves: nothing is widened into float32 copies.
//
// A call whose query, key or value holds a magnitude outside the dot product's exact range (subnormal,
// below 2^-55, 2^63 or more, inf, NaN: see gemm_bf16.cpp) returns false before writing anything the
// caller keeps; the caller then runs the float32 kernel on widened copies, whose IEEE arithmetic the
// non-finite rules of the other paths rely on. So here every operand is finite, and causal blocks above
// the diagonal are skipped without the rows_finite check of sdpa.cpp.
#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/bf16_pairs.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/sdpa_tile.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

using Panels = PairPanels<2>;
constexpr int64_t kNRp = Panels::NR;  // 32 columns per B panel
static_assert(kBq % kNRp == 0 && kBq % 16 == 0 && kFc % 2 == 0, "sdpa_bf16: block sizes");

struct Bf16Workspace {
  int64_t ev_pad;
  AlignedBuffer qt, kp, st, pp, vp, o;
  std::vector<float> m, l, alpha;
  Bf16Workspace(int64_t E, int64_t Ev)
      : ev_pad(round_up(std::max<int64_t>(Ev, 1), kNRp)),
        qt(2 * Panels::depth(std::max<int64_t>(E, 1)) * kBq),        // Q^T as B panels (kc = E)
        kp(2 * kMR * Panels::depth(std::max<int64_t>(E, 1))),        // one A panel of K rows
        st(sizeof(float) * kFc * kBq),                               // S^T, then P^T (row stride kBq)
        pp(2 * kBq * Panels::depth(kFc)),                            // P as A panels (kc = bc)
        vp(2 * Panels::depth(kFc) * ev_pad),                         // V as B panels (kc = bc)
        o(sizeof(float) * kBq * ev_pad),
        m(kBq),
        l(kBq),
        alpha(kBq) {
    std::fill(static_cast<float*>(st.p), static_cast<float*>(st.p) + kFc * kBq, 0.0f);  // see SdpaWorkspace
  }
};

// 16 float32 -> bfloat16 bits (round to nearest even, NaN kept NaN) in the low half of each 32-bit lane.
FASTNN_INLINE __m512i round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x), hi = _mm512_srli_epi32(u, 16);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                               _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
}

// P^T (bc keys x queries, row stride ld, float32) -> A panels of P (8 queries x bc keys in pairs, as
// PairPanels::pack_a lays them out), rounded to bfloat16, for queries [0, nq) (nq a multiple of 16).
void pack_p(const float* St, int64_t ld, int64_t nq, int64_t bc, uint16_t* Pp) {
  const int64_t kd = Panels::depth(bc);
  Word* d = reinterpret_cast<Word*>(Pp);
  for (int64_t i = 0; i < nq; i += 16) {
    Word* p0 = d + i / kMR * kMR * (kd / 2);  // the panels of queries i .. i + 7 and i + 8 .. i + 15
    Word* p1 = p0 + kMR * (kd / 2);
    for (int64_t k = 0; k < bc; k += 2) {
      const __m512i lo = round_bf16(_mm512_loadu_ps(St + k * ld + i));
      const __m512i hi = k + 1 < bc ? round_bf16(_mm512_loadu_ps(St + (k + 1) * ld + i)) : _mm512_setzero_si512();
      const __m512i w = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));  // (key k, key k + 1) per query
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0 + k / 2 * kMR), _mm512_castsi512_si256(w));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1 + k / 2 * kMR), _mm512_extracti64x4_epi64(w, 1));
    }
  }
}

// One (head b, block of queries from q0) on bf16 operands; false as soon as an operand is out of range.
bool block_bf16(const SdpaArgs<float>& a, const uint16_t* Q16, const uint16_t* K16, const uint16_t* V16, int64_t b,
                int64_t q0, Bf16Workspace& ws, Panels& pn) {
  constexpr int64_t ld = kBq, NR = kNRp;
  const int64_t E = a.E, Ev = a.Ev, S = a.S, dE = Panels::depth(E);
  const int64_t bq = std::min(kBq, a.L - q0);
  const Bf16* Q = reinterpret_cast<const Bf16*>(Q16 + a.q_off[b] + q0 * a.q_rs);
  const Bf16* K = reinterpret_cast<const Bf16*>(K16 + a.k_off[b]);
  const Bf16* V = reinterpret_cast<const Bf16*>(V16 + a.v_off[b]);
  uint16_t* Qt = static_cast<uint16_t*>(ws.qt.p);
  uint16_t* Kp = static_cast<uint16_t*>(ws.kp.p);
  float* St = static_cast<float*>(ws.st.p);
  uint16_t* Pp = static_cast<uint16_t*>(ws.pp.p);
  uint16_t* Vp = static_cast<uint16_t*>(ws.vp.p);
  float* Ob = static_cast<float*>(ws.o.p);
  const int64_t ldo = ws.ev_pad;
  float *m = ws.m.data(), *l = ws.l.data(), *alpha = ws.alpha.data();

  // B operand (e, i) = Q[i][e], pairs along e: packed once for all key blocks (columns contiguous: b_rs = 1).
  for (int64_t ip = 0; ip * NR < bq; ++ip)
    pn.pack_b(Q + ip * NR * a.q_rs, 1, a.q_rs, E, std::min(NR, bq - ip * NR), Qt + ip * NR * dE);
  if (!pn.usable()) return false;
  std::fill(Ob, Ob + kBq * ldo, 0.0f);
  std::fill(m, m + kBq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + kBq, 0.0f);
  const __m512 scale = _mm512_set1_ps(a.scale);
  const int64_t nq = round_up(bq, 16);

  // Causal: the keys past the block's last query are masked for all its queries, and every operand is
  // finite here, so their blocks are skipped (the masked scores' zero probabilities times finite values).
  const int64_t s_end = a.causal ? std::min(S, q0 + bq) : S;
  for (int64_t k0 = 0; k0 < s_end; k0 += kFc) {
    const int64_t bc = std::min(kFc, s_end - k0), dc = Panels::depth(bc);
    // S^T[j][i] = k_j . q_i: one packed A panel of 8 key rows at a time, then scaled in float32.
    for (int64_t j = 0; j < bc; j += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, bc - j);
      pn.pack_a(K + (k0 + j) * a.k_rs, a.k_rs, 1, mr, E, Kp);
      for (int64_t ip = 0; ip * NR < bq; ++ip)
        pn.kernel(E, Kp, 1, kMR, Qt + ip * NR * dE, St + j * ld + ip * NR, ld, mr, std::min(NR, bq - ip * NR), false,
                  nullptr, false);
    }
    if (!pn.usable()) return false;
    for (int64_t j = 0; j < bc; ++j)
      for (int64_t i = 0; i < nq; i += 16) _mm512_storeu_ps(St + j * ld + i, _mm512_mul_ps(_mm512_loadu_ps(St + j * ld + i), scale));
    mask_scores(a, b, q0, bq, k0, bc, St, int64_t(1), ld);
    online_softmax_tile(St, ld, bq, bc, m, l, alpha);
    if (a.dropout) dropout_tile_t(a, b, q0, round_up(bq, kU32Lanes), k0, bc, St, ld);
    rescale_rows(Ob, ldo, bq, alpha);
    // O += P V over this key block: P rounded to bf16 panels, V packed in pairs of keys (rows contiguous).
    pack_p(St, ld, nq, bc, Pp);
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      pn.pack_b(V + k0 * a.v_rs + cp * NR, a.v_rs, 1, bc, std::min(NR, Ev - cp * NR), Vp + cp * NR * dc);
    if (!pn.usable()) return false;
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        pn.kernel(bc, Pp + ip * kMR * dc, 1, kMR, Vp + cp * NR * dc, Ob + ip * kMR * ldo + cp * NR, ldo,
                  std::min<int64_t>(kMR, bq - ip * kMR), std::min(NR, Ev - cp * NR), true, nullptr, false);
  }
  finish_rows(a, b, q0, bq, Ob, ldo, m, l);
  return true;
}

bool sdpa_bf16(const SdpaArgs<float>& a, const uint16_t* Q, const uint16_t* K, const uint16_t* V) {
  if (a.batch == 0 || a.L == 0) return true;
  const int64_t qblocks = (a.L + kBq - 1) / kBq;
  const int64_t tasks = a.batch * qblocks;
  const int64_t nt = std::min<int64_t>(num_threads(), tasks);
  std::vector<std::unique_ptr<Bf16Workspace>> ws;  // allocated outside the parallel region
  for (int64_t t = 0; t < nt; ++t) ws.emplace_back(new Bf16Workspace(a.E, a.Ev));
  Panels pn;  // shared: its flag says whether any operand was out of range
  parallel_items(tasks, nt, [&](int64_t t) {
    if (!pn.usable()) return;
    const int64_t qb = a.causal ? qblocks - 1 - t % qblocks : t % qblocks;
    block_bf16(a, Q, K, V, t / qblocks, qb * kBq, *ws[thread_index()], pn);
  });
  return pn.usable();
}

}  // namespace

// For kernel_table() (gemm_bf16.cpp).
bool attention_bf16(const SdpaArgs<float>& a, const uint16_t* Q, const uint16_t* K, const uint16_t* V) {
  return sdpa_bf16(a, Q, K, V);
}

}  // namespace fastnn::cpu::FASTNN_ISA
