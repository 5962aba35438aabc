// Flash-style scaled dot-product attention: for each (head, block of kBq queries) the keys are visited in
// blocks of kBc with an online softmax, so memory beyond the output is O(kBq * (E + kBc + Ev)) per thread,
// never L x S. Both products (Q K^T and P V) go through the GEMM packing and micro-kernel; key blocks
// entirely above the diagonal are skipped when causal.
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/gemm_kernel.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

constexpr int64_t kBq = 8 * kMR;  // queries per block: whole A panels
template <typename T> constexpr int64_t kBc = 4 * kNR<T>;  // keys per block: whole B panels

template <typename T> struct SdpaWorkspace {
  int64_t e_pad, ev_pad;
  AlignedBuffer qp, kp, s, vp, o;
  std::vector<T> m, l;
  SdpaWorkspace(int64_t E, int64_t Ev)
      : e_pad(std::max<int64_t>(E, 1)),
        ev_pad(round_up(std::max<int64_t>(Ev, 1), kNR<T>)),
        qp(sizeof(T) * kBq * e_pad),
        kp(sizeof(T) * kBc<T> * e_pad),
        s(sizeof(T) * kBq * kBc<T>),
        vp(sizeof(T) * kBc<T> * ev_pad),
        o(sizeof(T) * kBq * ev_pad),
        m(kBq),
        l(kBq) {
    // Rows of the last A panel past the block's queries are read (never stored): keep them finite.
    std::fill(static_cast<T*>(s.p), static_cast<T*>(s.p) + kBq * kBc<T>, T(0));
  }
};

// Applies the causal rule and the mask to the scores tile s (bq x bc, row stride lds) of queries q0..
// and keys k0.. of head b: disallowed scores become -inf, a float mask is added. (The scale is already
// in the scores: Q is scaled when it is packed, see pack_scaled_q.)
template <typename T>
void mask_scores(const SdpaArgs<T>& a, int64_t b, int64_t q0, int64_t bq, int64_t k0, int64_t bc, T* s, int64_t lds) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (!a.causal && !a.fmask && !a.bmask) return;
  for (int64_t i = 0; i < bq; ++i, s += lds) {
    const int64_t qi = q0 + i;
    const int64_t jend = a.causal ? std::max<int64_t>(0, std::min(bc, qi - k0 + 1)) : bc;
    for (int64_t j = jend; j < bc; ++j) s[j] = ninf;
    if (a.fmask || a.bmask) {
      const int64_t mo = a.m_off[b] + qi * a.m_rs + k0 * a.m_cs;
      if (a.fmask) {
        for (int64_t j = 0; j < jend; ++j) s[j] += a.fmask[mo + j * a.m_cs];
      } else {
        for (int64_t j = 0; j < jend; ++j)
          if (!a.bmask[mo + j * a.m_cs]) s[j] = ninf;
      }
    }
  }
}

// Packs rows [0, bq) of Q (row stride q_rs) as A panels over kc = E, multiplied by the scale.
template <typename T> void pack_scaled_q(const SdpaArgs<T>& a, const T* Q, int64_t bq, T* Qp) {
  pack_a(Q, a.q_rs, int64_t(1), bq, a.E, Qp);
  const int64_t n = round_up(bq, kMR) * a.E;
  for (int64_t i = 0; i < n; ++i) Qp[i] *= a.scale;
}

// Row max that propagates NaN: a NaN score must make the row NaN, not look like "no allowed key".
template <typename T> T row_nanmax(const T* s, int64_t n, T init) {
  constexpr int64_t W = kLanes<T>;
  int64_t j = 0;
  T m = init;
  if (n >= W) {
    Vec<T> mv = vset<T>(init);
    for (; j + W <= n; j += W) {
      const Vec<T> v = vload(s + j);
      mv = (v > mv) | (v != v) ? v : mv;
    }
    for (int64_t t = 0; t < W; ++t) m = (mv[t] > m || mv[t] != mv[t]) ? mv[t] : m;
  }
  for (; j < n; ++j) m = (s[j] > m || s[j] != s[j]) ? s[j] : m;
  return m;
}

template <typename T> void sdpa_block(const SdpaArgs<T>& a, int64_t b, int64_t q0, SdpaWorkspace<T>& ws) {
  constexpr int64_t NR = kNR<T>, Bc = kBc<T>, W = kLanes<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t E = a.E, Ev = a.Ev, S = a.S;
  const int64_t bq = std::min(kBq, a.L - q0);
  const T* Q = a.Q + a.q_off[b] + q0 * a.q_rs;
  const T* K = a.K + a.k_off[b];
  const T* V = a.V + a.v_off[b];
  T* Qp = static_cast<T*>(ws.qp.p);
  T* Kp = static_cast<T*>(ws.kp.p);
  T* Sb = static_cast<T*>(ws.s.p);
  T* Vp = static_cast<T*>(ws.vp.p);
  T* Ob = static_cast<T*>(ws.o.p);
  const int64_t ldo = ws.ev_pad;
  T* m = ws.m.data();
  T* l = ws.l.data();

  pack_scaled_q(a, Q, bq, Qp);
  std::fill(Ob, Ob + kBq * ldo, T(0));
  std::fill(m, m + kBq, ninf);
  std::fill(l, l + kBq, T(0));

  // Causal: keys past the last query of this block are masked for every row of it.
  const int64_t s_end = a.causal ? std::min(S, q0 + bq) : S;
  for (int64_t k0 = 0; k0 < s_end; k0 += Bc) {
    const int64_t bc = std::min(Bc, s_end - k0);
    // Scores: Sb[i][j] = scale * q_i . k_j (B operand element (e, j) = K[j][e]), then masked.
    pack_b(K + k0 * a.k_rs, int64_t(1), a.k_rs, E, bc, Kp);
    gemm_packed(Qp, Kp, bq, bc, E, Sb, Bc, false);
    mask_scores(a, b, q0, bq, k0, bc, Sb, Bc);
    // Online softmax: Sb becomes P = exp(s - m_new) in place (row-major), l and O are rescaled.
    for (int64_t i = 0; i < bq; ++i) {
      T* s = Sb + i * Bc;
      const T m_new = row_nanmax(s, bc, m[i]);
      if (m_new == ninf) {  // nothing allowed yet for this row
        std::fill(s, s + bc, T(0));
        continue;
      }
      const T alpha = std::exp(m[i] - m_new);  // exp(-inf) = 0 on the first allowed block
      const Vec<T> mv = vset<T>(m_new);
      Vec<T> acc{};
      int64_t j = 0;
      for (; j + W <= bc; j += W) {
        const Vec<T> e = vexp(vload(s + j) - mv);
        vstore(s + j, e);
        acc += e;
      }
      T sum = hsum(acc);
      for (; j < bc; ++j) {
        s[j] = std::exp(s[j] - m_new);
        sum += s[j];
      }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
      if (alpha != T(1)) {
        T* o = Ob + i * ldo;
        for (int64_t c = 0; c < Ev; ++c) o[c] *= alpha;
      }
    }
    // O += P V over this key block (kc = bc). P is read in place as a row-major A operand; the rows of
    // the last panel past bq hold stale finite values whose results are never stored.
    pack_b(V + k0 * a.v_rs, a.v_rs, int64_t(1), bc, Ev, Vp);
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        micro_kernel<T>(bc, Sb + ip * kMR * Bc, Bc, 1, Vp + cp * NR * bc, Ob + ip * kMR * ldo + cp * NR, ldo,
                        std::min<int64_t>(kMR, bq - ip * kMR), std::min(NR, Ev - cp * NR), true, nullptr, false);
  }
  T* out = a.O + b * a.o_bs + q0 * Ev;
  for (int64_t i = 0; i < bq; ++i) {
    // No allowed key (l == 0): zeros, not NaN. A NaN score makes l NaN and the row NaN, as in the oracle.
    const bool empty = l[i] == T(0);
    const T inv = empty ? T(0) : T(1) / l[i];
    const T* o = Ob + i * ldo;
    for (int64_t c = 0; c < Ev; ++c) out[i * Ev + c] = empty ? T(0) : o[c] * inv;
    if (a.lse) a.lse[b * a.L + q0 + i] = empty ? ninf : m[i] + std::log(l[i]);
  }
}

}  // namespace

template <typename T> void sdpa(const SdpaArgs<T>& a) {
  if (a.batch == 0 || a.L == 0) return;
  const int64_t qblocks = (a.L + kBq - 1) / kBq;
  const int64_t tasks = a.batch * qblocks;
  const int64_t nt = std::min<int64_t>(num_threads(), tasks);
  // Workspaces are allocated here, outside the parallel region (bad_alloc must reach Python).
  std::vector<std::unique_ptr<SdpaWorkspace<T>>> ws;
  for (int64_t t = 0; t < nt; ++t) ws.emplace_back(new SdpaWorkspace<T>(a.E, a.Ev));
  parallel_items(tasks, nt, [&](int64_t t) {
    // Largest blocks first when causal: later query blocks see more keys.
    const int64_t qb = a.causal ? qblocks - 1 - t % qblocks : t % qblocks;
    sdpa_block(a, t / qblocks, qb * kBq, *ws[thread_index()]);
  });
}

template void sdpa<float>(const SdpaArgs<float>&);
template void sdpa<double>(const SdpaArgs<double>&);

// ---- backward -----------------------------------------------------------------------------------
// Per head, keys in blocks of kBc (outer) and queries in blocks of kBq (inner), all tiles in cache:
//   P = exp(mask(scale * Q K^T) - lse),  dP = dO V^T,  dS = scale * P * (dP - D),  D_i = dO_i . O_i
//   dV_j += P^T dO,  dK_j += dS^T Q,  dQ_i += dS K_j
// dK_j and dV_j accumulate in the workspace over all query blocks; dQ accumulates in the output.
// Threads take whole heads, so no two threads write the same gradient.

template <typename T> struct SdpaBackwardWorkspace {
  int64_t e_pad, ev_pad;
  AlignedBuffer qp, kt, vt, p, dp, pt, dop, qb, dsp, kb, dk, dv;
  std::vector<T> d;
  SdpaBackwardWorkspace(int64_t L, int64_t E, int64_t Ev)
      : e_pad(round_up(std::max<int64_t>(E, 1), kNR<T>)),
        ev_pad(round_up(std::max<int64_t>(Ev, 1), kNR<T>)),
        qp(sizeof(T) * kBq * std::max<int64_t>(E, 1)),     // Q_i as A panels (kc = E)
        kt(sizeof(T) * std::max<int64_t>(E, 1) * kBc<T>),  // K_j^T as B panels (kc = E)
        vt(sizeof(T) * std::max<int64_t>(Ev, 1) * kBc<T>), // V_j^T as B panels (kc = Ev)
        p(sizeof(T) * kBq * kBc<T>),                      // scores, then P
        dp(sizeof(T) * kBq * kBc<T>),                     // dP, then dS
        pt(sizeof(T) * round_up(kBc<T>, kMR) * kBq),       // P^T or dS^T as A panels (kc = bq)
        dop(sizeof(T) * kBq * ev_pad),                     // dO_i as B panels (kc = bq); also dO_i as A
        qb(sizeof(T) * kBq * e_pad),                       // Q_i as B panels (kc = bq)
        dsp(sizeof(T) * kBq * kBc<T>),                     // dS as A panels (kc = bc)
        kb(sizeof(T) * kBc<T> * e_pad),                    // K_j as B panels (kc = bc)
        dk(sizeof(T) * kBc<T> * e_pad),
        dv(sizeof(T) * kBc<T> * ev_pad),
        d(std::max<int64_t>(L, 1)) {}
};

template <typename T> void sdpa_backward_head(const SdpaBackwardArgs<T>& a, int64_t b, SdpaBackwardWorkspace<T>& ws) {
  constexpr int64_t Bc = kBc<T>;
  const int64_t L = a.L, S = a.S, E = a.E, Ev = a.Ev;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* Q = a.Q + a.q_off[b];
  const T* K = a.K + a.k_off[b];
  const T* V = a.V + a.v_off[b];
  const T* dO = a.dO + b * L * Ev;
  const T* Of = a.Of + b * L * Ev;
  const T* lse = a.lse_in + b * L;
  T* dQ = a.dQ + b * L * E;
  T* dK = a.dK + b * S * E;
  T* dV = a.dV + b * S * Ev;
  T* Qp = static_cast<T*>(ws.qp.p);
  T* Kt = static_cast<T*>(ws.kt.p);
  T* Vt = static_cast<T*>(ws.vt.p);
  T* P = static_cast<T*>(ws.p.p);
  T* dP = static_cast<T*>(ws.dp.p);
  T* Pt = static_cast<T*>(ws.pt.p);
  T* dOp = static_cast<T*>(ws.dop.p);
  T* Qb = static_cast<T*>(ws.qb.p);
  T* dSp = static_cast<T*>(ws.dsp.p);
  T* Kb = static_cast<T*>(ws.kb.p);
  T* dKa = static_cast<T*>(ws.dk.p);
  T* dVa = static_cast<T*>(ws.dv.p);
  const int64_t lde = ws.e_pad, ldev = ws.ev_pad;
  T* D = ws.d.data();

  for (int64_t i = 0; i < L; ++i) {
    T acc = 0;
    for (int64_t c = 0; c < Ev; ++c) acc += dO[i * Ev + c] * Of[i * Ev + c];
    D[i] = acc;
  }
  std::fill(dQ, dQ + L * E, T(0));
  for (int64_t k0 = 0; k0 < S; k0 += Bc) {
    const int64_t bc = std::min(Bc, S - k0);
    pack_b(K + k0 * a.k_rs, int64_t(1), a.k_rs, E, bc, Kt);   // (e, j) = K[j][e]
    pack_b(V + k0 * a.v_rs, int64_t(1), a.v_rs, Ev, bc, Vt);  // (c, j) = V[j][c]
    pack_b(K + k0 * a.k_rs, a.k_rs, int64_t(1), bc, E, Kb);   // (j, e) = K[j][e]
    std::fill(dKa, dKa + Bc * lde, T(0));
    std::fill(dVa, dVa + Bc * ldev, T(0));
    // Causal: query blocks that end before k0 see none of these keys.
    const int64_t q_first = a.causal ? (std::min(k0, L) / kBq) * kBq : 0;
    for (int64_t q0 = q_first; q0 < L; q0 += kBq) {
      const int64_t bq = std::min(kBq, L - q0);
      pack_scaled_q<T>(a, Q + q0 * a.q_rs, bq, Qp);
      gemm_packed(Qp, Kt, bq, bc, E, P, Bc, false);
      mask_scores<T>(a, b, q0, bq, k0, bc, P, Bc);
      pack_a(dO + q0 * Ev, Ev, int64_t(1), bq, Ev, dOp);
      gemm_packed(dOp, Vt, bq, bc, Ev, dP, Bc, false);
      for (int64_t i = 0; i < bq; ++i) {
        const T l = lse[q0 + i], di = D[q0 + i];
        T* pr = P + i * Bc;
        T* dr = dP + i * Bc;
        if (l == ninf) {  // a row with no allowed key has no gradient
          for (int64_t j = 0; j < bc; ++j) pr[j] = dr[j] = T(0);
          continue;
        }
        for (int64_t j = 0; j < bc; ++j) {
          const T pj = std::exp(pr[j] - l);
          pr[j] = pj;
          dr[j] = a.scale * pj * (dr[j] - di);
        }
      }
      // dV_j += P^T dO_i and dK_j += dS^T Q_i (kc = bq).
      pack_b(dO + q0 * Ev, Ev, int64_t(1), bq, Ev, dOp);
      pack_a(P, int64_t(1), Bc, bc, bq, Pt);
      gemm_packed(Pt, dOp, bc, Ev, bq, dVa, ldev, true);
      pack_b(Q + q0 * a.q_rs, a.q_rs, int64_t(1), bq, E, Qb);
      pack_a(dP, int64_t(1), Bc, bc, bq, Pt);
      gemm_packed(Pt, Qb, bc, E, bq, dKa, lde, true);
      // dQ_i += dS K_j (kc = bc).
      pack_a(dP, Bc, int64_t(1), bq, bc, dSp);
      gemm_packed(dSp, Kb, bq, E, bc, dQ + q0 * E, E, true);
    }
    for (int64_t j = 0; j < bc; ++j) {
      std::copy(dKa + j * lde, dKa + j * lde + E, dK + (k0 + j) * E);
      std::copy(dVa + j * ldev, dVa + j * ldev + Ev, dV + (k0 + j) * Ev);
    }
  }
}

template <typename T> void sdpa_backward(const SdpaBackwardArgs<T>& a) {
  if (a.batch == 0) return;
  const int64_t nt = std::min<int64_t>(num_threads(), a.batch);
  std::vector<std::unique_ptr<SdpaBackwardWorkspace<T>>> ws;
  for (int64_t t = 0; t < nt; ++t) ws.emplace_back(new SdpaBackwardWorkspace<T>(a.L, a.E, a.Ev));
  parallel_items(a.batch, nt, [&](int64_t b) { sdpa_backward_head(a, b, *ws[thread_index()]); });
}

template void sdpa_backward<float>(const SdpaBackwardArgs<float>&);
template void sdpa_backward<double>(const SdpaBackwardArgs<double>&);

}  // namespace fastnn::cpu::FASTNN_ISA
