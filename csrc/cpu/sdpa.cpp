// Flash-style scaled dot-product attention: for each (head, block of kBq queries) the keys are visited in
// blocks of kFc with an online softmax, so memory beyond the output is O(kBq * (E + kFc + Ev)) per thread,
// never L x S. Both products go through the GEMM micro-kernel; key blocks entirely above the diagonal
// are skipped when causal.
//
// The forward works on the transposed scores S^T = K Q^T (keys x queries): K is then the A operand, read
// in place (its rows are contiguous), and only Q^T is packed, once per query block; the online softmax
// runs down the columns with the queries in the vector lanes (no horizontal reductions); and
// O += P V reads P^T in place as the A operand. (Scores as Q K^T instead needed K^T packed for every
// query block, a strided gather that took a fifth of the time.)
//
// Dropout (SdpaArgs::dropout): the softmax sum l takes every probability, the dropped ones are then zeroed
// in the tile before P V (forward) or before the gradient products (backward, which regenerates the same
// bits), and 1 / (1 - p) scales the output. The bits depend on (seed, offset, head, query, key) only, so
// the result is independent of tiling and threads. Key tiles start at multiples of 4 (one Philox call
// covers 4 keys of a query; the queries are in the vector lanes).
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/gemm_kernel.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/philox.h"
#include "cpu/sdpa_tile.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

template <typename T> struct SdpaWorkspace {
  int64_t ev_pad;
  AlignedBuffer qt, kp, st, vp, o;
  std::vector<T> m, l, alpha;
  SdpaWorkspace(int64_t E, int64_t Ev)
      : ev_pad(round_up(std::max<int64_t>(Ev, 1), kNR<T>)),
        qt(sizeof(T) * std::max<int64_t>(E, 1) * kBq),    // scale * Q^T as B panels (kc = E)
        kp(sizeof(T) * kMR * std::max<int64_t>(E, 1)),    // a last, partial panel of K rows
        st(sizeof(T) * kFc * kBq),                         // S^T, then P^T (row stride kBq)
        vp(sizeof(T) * kFc * ev_pad),                      // V as B panels (kc = bc)
        o(sizeof(T) * kBq * ev_pad),
        m(kBq),
        l(kBq),
        alpha(kBq) {
    // Columns of S^T past a short last query block are read (never used): keep them finite.
    std::fill(static_cast<T*>(st.p), static_cast<T*>(st.p) + kFc * kBq, T(0));
  }
};

// Packs rows [0, bq) of Q (row stride q_rs) as A panels over kc = E, multiplied by the scale.
template <typename T> void pack_scaled_q(const SdpaArgs<T>& a, const T* Q, int64_t bq, T* Qp) {
  pack_a(Q, a.q_rs, int64_t(1), bq, a.E, Qp);
  const int64_t n = round_up(bq, kMR) * a.E;
  for (int64_t i = 0; i < n; ++i) Qp[i] *= a.scale;
}

// Whether rows [r0, r1) of an n-column matrix (row stride rs, unit column stride) hold only finite values.
// The causal kernels skip the blocks of keys above the diagonal; PyTorch's attention and the oracle do not
// (a masked score gets -inf added, NaN where the score is NaN or +inf; a zero probability times a NaN or inf
// value is NaN). So a block is skipped only when the rows it would involve are finite: one read of those rows,
// small beside the block's products, and nothing for the rows a block does not skip.
template <typename T> bool rows_finite(const T* x, int64_t rs, int64_t n, int64_t r0, int64_t r1) {
  constexpr int64_t W = kLanes<T>;
  using V = Vec<T>;
  const V zero = vset<T>(T(0));
  IVec<T> bad{};
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * rs;
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      const V z = vload(row + c) * zero;  // 0 * x: 0 for a finite x, NaN for NaN and +-inf
      bad |= z != z;
    }
    if (c < n) {
      const V z = vload_part(row + c, n - c, T(0)) * zero;
      bad |= z != z;
    }
  }
  T lanes[W];
  vstore(lanes, bad ? vset<T>(T(1)) : zero);
  for (int64_t i = 0; i < W; ++i)
    if (lanes[i] != T(0)) return false;
  return true;
}

template <typename T> void sdpa_block(const SdpaArgs<T>& a, int64_t b, int64_t q0, SdpaWorkspace<T>& ws) {
  constexpr int64_t NR = kNR<T>, ld = kBq;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t E = a.E, Ev = a.Ev, S = a.S;
  const int64_t bq = std::min(kBq, a.L - q0);
  const T* Q = a.Q + a.q_off[b] + q0 * a.q_rs;
  const T* K = a.K + a.k_off[b];
  const T* Vm = a.V + a.v_off[b];
  T* Qt = static_cast<T*>(ws.qt.p);
  T* Kp = static_cast<T*>(ws.kp.p);
  T* St = static_cast<T*>(ws.st.p);
  T* Vp = static_cast<T*>(ws.vp.p);
  T* Ob = static_cast<T*>(ws.o.p);
  const int64_t ldo = ws.ev_pad;
  T* m = ws.m.data();
  T* l = ws.l.data();
  T* alpha = ws.alpha.data();

  // B operand (e, i) = scale * Q[i][e]: packed once for all key blocks.
  pack_b(Q, int64_t(1), a.q_rs, E, bq, Qt);
  for (int64_t n = round_up(bq, NR) * E, i = 0; i < n; ++i) Qt[i] *= a.scale;
  std::fill(Ob, Ob + kBq * ldo, T(0));
  std::fill(m, m + kBq, ninf);
  std::fill(l, l + kBq, T(0));

  // Causal: keys past the last query of this block are masked for every query of it: skipped, unless a
  // non-finite query of the block or key / value past it makes a masked score or product NaN (rows_finite).
  int64_t s_end = a.causal ? std::min(S, q0 + bq) : S;
  if (s_end < S && !(rows_finite(Q, a.q_rs, E, 0, bq) && rows_finite(K, a.k_rs, E, s_end, S) &&
                     rows_finite(Vm, a.v_rs, Ev, s_end, S)))
    s_end = S;
  for (int64_t k0 = 0; k0 < s_end; k0 += kFc) {
    const int64_t bc = std::min(kFc, s_end - k0);
    // S^T[j][i] = scale * k_j . q_i: whole panels of K rows read in place, a partial last one packed.
    for (int64_t jp = 0; jp * kMR < bc; ++jp) {
      const int64_t j = jp * kMR, mr = std::min<int64_t>(kMR, bc - j);
      const T* Kj = K + (k0 + j) * a.k_rs;
      const bool in_place = mr == kMR;
      if (!in_place) pack_a_panel(Kj, a.k_rs, int64_t(1), mr, E, Kp);
      for (int64_t ip = 0; ip * NR < bq; ++ip)
        micro_kernel<T>(E, in_place ? Kj : Kp, in_place ? a.k_rs : 1, in_place ? 1 : kMR, Qt + ip * NR * E, NR,
                        St + j * ld + ip * NR, ld, mr, std::min(NR, bq - ip * NR), false, nullptr, false);
    }
    mask_scores(a, b, q0, bq, k0, bc, St, int64_t(1), ld);
    online_softmax_tile(St, ld, bq, bc, m, l, alpha);
    if (a.dropout) dropout_tile_t(a, b, q0, round_up(bq, kU32Lanes), k0, bc, St, ld);
    rescale_rows(Ob, ldo, bq, alpha);
    // O += P V over this key block (kc = bc), P^T read in place: A element (i, j) = P^T[j][i]. V is read
    // in place too when its rows hold whole panels, else packed.
    const T* Vk = Vm + k0 * a.v_rs;
    const bool v_in_place = Ev % NR == 0;
    if (!v_in_place) pack_b(Vk, a.v_rs, int64_t(1), bc, Ev, Vp);
    for (int64_t cp = 0; cp * NR < Ev; ++cp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        micro_kernel<T>(bc, St + ip * kMR, 1, ld, v_in_place ? Vk + cp * NR : Vp + cp * NR * bc,
                        v_in_place ? a.v_rs : NR, Ob + ip * kMR * ldo + cp * NR, ldo,
                        std::min<int64_t>(kMR, bq - ip * kMR), std::min(NR, Ev - cp * NR), true, nullptr, false);
  }
  finish_rows(a, b, q0, bq, Ob, ldo, m, l);
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
// Dropout, with Z = keep / (1 - p) the regenerated mask: dV_j += (P * Z)^T dO and dS = scale * P * (dP * Z - D)
// (D = dO . O still: the output already holds the dropout).

static_assert(kBc<float> % 4 == 0 && kBc<double> % 4 == 0, "dropout: backward key tiles must start at multiples of 4");

template <typename T> struct SdpaBackwardWorkspace {
  int64_t e_pad, ev_pad;
  AlignedBuffer qp, kt, vt, p, dp, pt, dop, qb, dsp, kb, dk, dv, z;
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
        z(sizeof(int32_t) * round_up(kBq, kU32Lanes) * kBc<T>),  // dropout keep mask (row stride kBc)
        d(std::max<int64_t>(L, 1)) {}
};

// D_i = rowsum(dP * P) computed as written (the oracle's and PyTorch's math path) over every key of query row i,
// for a row whose dO_i . O_i is not finite: there the two differ (dO_i . O_i is +-inf where an infinite value
// makes the row's sum +-inf, and NaN or an infinity of either sign where an infinite dO_i does). Scalar code
// for rare rows; s and z are scratch for one strip of Bc keys (z: the Z tile, whole rows of lanes).
template <typename T>
T exact_row_d(const SdpaBackwardArgs<T>& a, int64_t b, int64_t i, const T* Q, const T* K, const T* V, const T* dOi,
              T l, T* s, int32_t* z) {
  constexpr int64_t Bc = kBc<T>;
  const T* qi = Q + i * a.q_rs;
  T d = 0;
  for (int64_t k0 = 0; k0 < a.S; k0 += Bc) {
    const int64_t bc = std::min(Bc, a.S - k0);
    for (int64_t j = 0; j < bc; ++j) {
      const T* kj = K + (k0 + j) * a.k_rs;
      T acc = 0;
      for (int64_t e = 0; e < a.E; ++e) acc += qi[e] * kj[e];
      s[j] = acc * a.scale;
    }
    mask_scores<T>(a, b, i, 1, k0, bc, s, Bc, int64_t(1));
    if (a.dropout) dropout_keep_rows(a, b, i, 1, k0, bc, z, Bc);
    for (int64_t j = 0; j < bc; ++j) {
      const T* vj = V + (k0 + j) * a.v_rs;
      T dp = 0;
      for (int64_t c = 0; c < a.Ev; ++c) dp += dOi[c] * vj[c];
      if (a.dropout) dp *= z[j] ? T(a.keep_scale) : T(0);  // a product, as the tiles: inf * 0 is NaN there too
      d += std::exp(s[j] - l) * dp;
    }
  }
  return d;
}

template <typename T> void sdpa_backward_head(const SdpaBackwardArgs<T>& a, int64_t b, SdpaBackwardWorkspace<T>& ws) {
  constexpr int64_t Bc = kBc<T>, W = kLanes<T>;
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
  int32_t* Z = static_cast<int32_t*>(ws.z.p);
  const int64_t lde = ws.e_pad, ldev = ws.ev_pad;
  T* D = ws.d.data();
  // Causal: the query blocks before a key block are skipped unless one of their rows (Q, dO, O, lse) or one of
  // the block's keys / values is not finite (rows_finite): the first such query row, once per head.
  int64_t bad_row = L;
  if (a.causal) {
    for (int64_t i = 0; i < L && bad_row == L; i += kBq) {
      const int64_t n = std::min(kBq, L - i);
      if (!(rows_finite(Q, a.q_rs, E, i, i + n) && rows_finite(dO, Ev, Ev, i, i + n) &&
            rows_finite(Of, Ev, Ev, i, i + n) && rows_finite(lse, int64_t(1), int64_t(1), i, i + n)))
        bad_row = i;
    }
  }

  for (int64_t i = 0; i < L; ++i) {
    T acc = 0;
    for (int64_t c = 0; c < Ev; ++c) acc += dO[i * Ev + c] * Of[i * Ev + c];
    // D_i = dO_i . O_i equals rowsum(dP * P) (PyTorch's math path and the oracle) where it is finite; where it
    // is not, the rowsum is taken as written (a row with no allowed key has no gradient: D is unused there).
    D[i] = std::isfinite(acc) || lse[i] == ninf ? acc : exact_row_d(a, b, i, Q, K, V, dO + i * Ev, lse[i], P, Z);
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
    int64_t q_first = a.causal ? (std::min(k0, L) / kBq) * kBq : 0;
    if (q_first > 0 && (bad_row < q_first || !(rows_finite(K, a.k_rs, E, k0, k0 + bc) &&
                                               rows_finite(V, a.v_rs, Ev, k0, k0 + bc))))
      q_first = 0;
    for (int64_t q0 = q_first; q0 < L; q0 += kBq) {
      const int64_t bq = std::min(kBq, L - q0);
      pack_scaled_q<T>(a, Q + q0 * a.q_rs, bq, Qp);
      gemm_packed(Qp, Kt, bq, bc, E, P, Bc, false);
      mask_scores<T>(a, b, q0, bq, k0, bc, P, Bc, int64_t(1));
      pack_a(dO + q0 * Ev, Ev, int64_t(1), bq, Ev, dOp);
      gemm_packed(dOp, Vt, bq, bc, Ev, dP, Bc, false);
      probs_and_score_grads(a, b, q0, bq, k0, bc, P, dP, Bc, lse + q0, D + q0, Z);
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
