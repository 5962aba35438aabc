// Attention forward on bfloat16 query / key / value with the AVX512-BF16 dot product (avx512bf16 unit):
// sdpa.cpp's flash-style forward (transposed scores S^T = K Q^T, online softmax down the columns, O += P V)
// with both products on bf16 pair panels (bf16_pairs.h) and everything between them in float32: the scores
// are scaled in float32 after the product (Q is not rounded again), and only the probabilities are rounded
// to bfloat16 for P V (relative error 2^-9 each; PyTorch's CPU flash attention rounds them the same way),
// times 2^32 so that no nonzero probability is a subnormal the instruction would read as zero (the sums are
// scaled back exactly at the end).
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
    if (!pack_rounded_at(St, ld, nq, bq, bc, Pp)) return pn.flag(true), false;  // P times 2^32 (bf16_pairs.h)
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      pn.pack_b(V + k0 * a.v_rs + cp * NR, a.v_rs, 1, bc, std::min(NR, Ev - cp * NR), Vp + cp * NR * dc);
    if (!pn.usable()) return false;
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        pn.kernel(bc, Pp + ip * kMR * dc, 1, kMR, Vp + cp * NR * dc, Ob + ip * kMR * ldo + cp * NR, ldo,
                  std::min<int64_t>(kMR, bq - ip * kMR), std::min(NR, Ev - cp * NR), true, nullptr, false);
  }
  finish_rows(a, b, q0, bq, Ob, ldo, m, l, kOperandUnscale);
  return true;
}

}  // namespace

// The entry points of kernel_table() (gemm_bf16.cpp).
bool attention_bf16(const SdpaArgs<float>& a, const uint16_t* Q, const uint16_t* K, const uint16_t* V) {
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

// ---- backward ---------------------------------------------------------------------------------------
// sdpa.cpp's backward (per head: key blocks of Bc outer, query blocks of kBq inner, dK_j / dV_j accumulated
// in the workspace, dQ in the output) with its five products on pair panels: S = Q_i K_j^T and dP = dO_i V_j^T
// from the bf16 operands, dV_j += P^T dO_i, dK_j += dS^T Q_i and dQ_i += dS K_j with P and dS rounded to
// bfloat16 (as PyTorch's CPU flash attention rounds them). D_i = dO_i . O_i in float32 from the bf16 rows.

namespace {

constexpr int64_t kBcb = kBc<float>;  // keys per block (128)

struct Bf16BackwardWorkspace {
  int64_t e_pad, ev_pad;
  AlignedBuffer qa, kt, doa, vt, p, dp, pt, dob, qb, ds16, dsa, kb, dk, dv, z;
  std::vector<float> d;
  Bf16BackwardWorkspace(int64_t L, int64_t E, int64_t Ev)
      : e_pad(round_up(std::max<int64_t>(E, 1), kNRp)),
        ev_pad(round_up(std::max<int64_t>(Ev, 1), kNRp)),
        qa(2 * kBq * Panels::depth(std::max<int64_t>(E, 1))),     // Q_i as A panels (kc = E)
        kt(2 * Panels::depth(std::max<int64_t>(E, 1)) * kBcb),    // K_j^T as B panels (kc = E)
        doa(2 * kBq * Panels::depth(std::max<int64_t>(Ev, 1))),   // dO_i as A panels (kc = Ev)
        vt(2 * Panels::depth(std::max<int64_t>(Ev, 1)) * kBcb),   // V_j^T as B panels (kc = Ev)
        p(sizeof(float) * kBq * kBcb),                            // scores, then P
        dp(sizeof(float) * kBq * kBcb),                           // dP, then dS
        pt(2 * kBcb * Panels::depth(kBq)),                        // P^T or dS^T as A panels (kc = bq)
        dob(2 * Panels::depth(kBq) * ev_pad),                     // dO_i as B panels (kc = bq)
        qb(2 * Panels::depth(kBq) * e_pad),                       // Q_i as B panels (kc = bq)
        ds16(2 * kBq * kBcb),                                     // dS rounded, row-major
        dsa(2 * kBq * Panels::depth(kBcb)),                       // dS as A panels (kc = bc)
        kb(2 * Panels::depth(kBcb) * e_pad),                      // K_j as B panels (kc = bc)
        dk(sizeof(float) * kBcb * e_pad),
        dv(sizeof(float) * kBcb * ev_pad),
        z(sizeof(int32_t) * round_up(kBq, kU32Lanes) * kBcb),     // dropout keep mask (row stride kBcb)
        d(std::max<int64_t>(L, 1)) {
    // P and dP columns past a short key block are read by pack_rounded_at (only into rows the kernel does not
    // store; its range check covers the valid columns): zero at first, then whatever an earlier block left.
    std::fill(static_cast<float*>(p.p), static_cast<float*>(p.p) + kBq * kBcb, 0.0f);
    std::fill(static_cast<float*>(dp.p), static_cast<float*>(dp.p) + kBq * kBcb, 0.0f);
  }
};

bool backward_head_bf16(const SdpaBackwardArgs<float>& a, const uint16_t* Q16, const uint16_t* K16,
                        const uint16_t* V16, const uint16_t* dO16, const uint16_t* O16, int64_t b,
                        Bf16BackwardWorkspace& ws, Panels& pn) {
  constexpr int64_t Bc = kBcb, NR = kNRp;
  const int64_t L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const float ninf = -std::numeric_limits<float>::infinity();
  const Bf16* Q = reinterpret_cast<const Bf16*>(Q16 + a.q_off[b]);
  const Bf16* K = reinterpret_cast<const Bf16*>(K16 + a.k_off[b]);
  const Bf16* V = reinterpret_cast<const Bf16*>(V16 + a.v_off[b]);
  const Bf16* dO = reinterpret_cast<const Bf16*>(dO16 + b * L * Ev);
  const uint16_t* O = O16 + b * L * Ev;
  const float* lse = a.lse_in + b * L;
  float* dQ = a.dQ + b * L * E;
  float* dK = a.dK + b * S * E;
  float* dV = a.dV + b * S * Ev;
  auto u16 = [](AlignedBuffer& x) { return static_cast<uint16_t*>(x.p); };
  auto f32 = [](AlignedBuffer& x) { return static_cast<float*>(x.p); };
  uint16_t *Qa = u16(ws.qa), *Kt = u16(ws.kt), *dOa = u16(ws.doa), *Vt = u16(ws.vt), *Pt = u16(ws.pt);
  uint16_t *dOb = u16(ws.dob), *Qb = u16(ws.qb), *dS16 = u16(ws.ds16), *dSa = u16(ws.dsa), *Kb = u16(ws.kb);
  float *P = f32(ws.p), *dP = f32(ws.dp), *dKa = f32(ws.dk), *dVa = f32(ws.dv);
  int32_t* Z = static_cast<int32_t*>(ws.z.p);
  const int64_t lde = ws.e_pad, ldev = ws.ev_pad;
  float* D = ws.d.data();
  {
    // D_i = dO_i . O_i (float32 products of the bf16 values). A non-finite one (an inf or NaN in dO or O):
    // the float32 kernel's exact rule is needed, so the call gives up.
    alignas(64) float x[256], y[256];
    for (int64_t i = 0; i < L; ++i) {
      float acc = 0;
      for (int64_t c0 = 0; c0 < Ev; c0 += 256) {
        const int64_t n = std::min<int64_t>(256, Ev - c0);
        widen_range(reinterpret_cast<const uint16_t*>(dO) + i * Ev + c0, x, 0, n, true);
        widen_range(O + i * Ev + c0, y, 0, n, true);
        for (int64_t c = 0; c < n; ++c) acc += x[c] * y[c];
      }
      // A NaN or +inf lse: the float32 kernel's rows_finite rule for the causal blocks it skips is needed too.
      if (!std::isfinite(acc) || std::isnan(lse[i]) || lse[i] == -ninf) return pn.flag(true), false;
      D[i] = acc;
    }
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  Panels scratch;
  std::fill(dQ, dQ + L * E, 0.0f);
  for (int64_t k0 = 0; k0 < S; k0 += Bc) {
    const int64_t bc = std::min(Bc, S - k0), nk = round_up(bc, 16);
    pack_b_all(pn, K + k0 * a.k_rs, 1, a.k_rs, E, bc, Kt);    // (e, j) = K[j][e]
    pack_b_all(pn, V + k0 * a.v_rs, 1, a.v_rs, Ev, bc, Vt);   // (c, j) = V[j][c]
    pack_b_all(pn, K + k0 * a.k_rs, a.k_rs, 1, bc, E, Kb);    // (j, e) = K[j][e]
    if (!pn.usable()) return false;
    std::fill(dKa, dKa + Bc * lde, 0.0f);
    std::fill(dVa, dVa + Bc * ldev, 0.0f);
    // Causal: query blocks that end before k0 see none of these keys (every operand is finite here).
    const int64_t q_first = a.causal ? (std::min(k0, L) / kBq) * kBq : 0;
    for (int64_t q0 = q_first; q0 < L; q0 += kBq) {
      const int64_t bq = std::min(kBq, L - q0);
      pack_a_all(pn, Q + q0 * a.q_rs, a.q_rs, 1, bq, E, Qa);
      gemm_pairs(pn, Qa, Kt, bq, bc, E, P, Bc, false);
      pack_a_all(pn, dO + q0 * Ev, Ev, 1, bq, Ev, dOa);
      gemm_pairs(pn, dOa, Vt, bq, bc, Ev, dP, Bc, false);
      if (!pn.usable()) return false;
      for (int64_t i = 0; i < bq; ++i)
        for (int64_t j = 0; j < nk; j += 16) _mm512_storeu_ps(P + i * Bc + j, _mm512_mul_ps(_mm512_loadu_ps(P + i * Bc + j), scale));
      mask_scores<float>(a, b, q0, bq, k0, bc, P, Bc, int64_t(1));
      probs_and_score_grads(a, b, q0, bq, k0, bc, P, dP, Bc, lse + q0, D + q0, Z);
      // dV_j += P^T dO_i and dK_j += dS^T Q_i (kc = bq).
      pack_b_all(pn, dO + q0 * Ev, Ev, 1, bq, Ev, dOb);
      if (!pack_rounded_at(P, Bc, nk, bc, bq, Pt)) return pn.flag(true), false;  // P and dS times 2^32
      gemm_pairs(pn, Pt, dOb, bc, Ev, bq, dVa, ldev, true);
      pack_b_all(pn, Q + q0 * a.q_rs, a.q_rs, 1, bq, E, Qb);
      if (!pack_rounded_at(dP, Bc, nk, bc, bq, Pt)) return pn.flag(true), false;
      gemm_pairs(pn, Pt, Qb, bc, E, bq, dKa, lde, true);
      // dQ_i += dS K_j (kc = bc): dS rounded row by row, then packed as row-major A.
      const __m512 up = _mm512_set1_ps(kOperandScale);
      for (int64_t i = 0; i < bq; ++i) {
        float* r = dP + i * Bc;
        for (int64_t j = 0; j < nk; j += 16) _mm512_storeu_ps(r + j, _mm512_mul_ps(_mm512_loadu_ps(r + j), up));
        narrow_range(r, dS16 + i * Bc, 0, bc, true);
      }
      // (The same values pack_rounded_at checked for dK, scaled the same way; scratch's [2^-55, 2^63) check,
      // meant for the operands, is ignored.)
      pack_a_all(scratch, reinterpret_cast<const Bf16*>(dS16), Bc, 1, bq, bc, dSa);
      gemm_pairs(pn, dSa, Kb, bq, E, bc, dQ + q0 * E, E, true);
    }
    for (int64_t j = 0; j < bc; ++j) {  // the sums of 2^32-scaled P and dS, scaled back (exact: a power of 2)
      for (int64_t e = 0; e < E; ++e) dK[(k0 + j) * E + e] = dKa[j * lde + e] * kOperandUnscale;
      for (int64_t c = 0; c < Ev; ++c) dV[(k0 + j) * Ev + c] = dVa[j * ldev + c] * kOperandUnscale;
    }
  }
  for (int64_t i = 0; i < L * E; ++i) dQ[i] *= kOperandUnscale;
  return true;
}

}  // namespace

bool attention_backward_bf16(const SdpaBackwardArgs<float>& a, const uint16_t* Q, const uint16_t* K,
                             const uint16_t* V, const uint16_t* dO, const uint16_t* O) {
  if (a.batch == 0) return true;
  const int64_t nt = std::min<int64_t>(num_threads(), a.batch);
  std::vector<std::unique_ptr<Bf16BackwardWorkspace>> ws;
  for (int64_t t = 0; t < nt; ++t) ws.emplace_back(new Bf16BackwardWorkspace(a.L, a.E, a.Ev));
  std::atomic<bool> ok{true};
  parallel_items(a.batch, nt, [&](int64_t b) {
    if (!ok.load(std::memory_order_relaxed)) return;
    Panels pn;
    if (!backward_head_bf16(a, Q, K, V, dO, O, b, *ws[thread_index()], pn)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

}  // namespace fastnn::cpu::FASTNN_ISA
