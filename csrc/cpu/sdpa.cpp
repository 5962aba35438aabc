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
  AlignedBuffer qp, kp, s, pp, vp, o;
  std::vector<T> m, l;
  SdpaWorkspace(int64_t E, int64_t Ev)
      : e_pad(std::max<int64_t>(E, 1)),
        ev_pad(round_up(std::max<int64_t>(Ev, 1), kNR<T>)),
        qp(sizeof(T) * kBq * e_pad),
        kp(sizeof(T) * kBc<T> * e_pad),
        s(sizeof(T) * kBq * kBc<T>),
        pp(sizeof(T) * kBq * kBc<T>),
        vp(sizeof(T) * kBc<T> * ev_pad),
        o(sizeof(T) * kBq * ev_pad),
        m(kBq),
        l(kBq) {}
};

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
  T* Pp = static_cast<T*>(ws.pp.p);
  T* Vp = static_cast<T*>(ws.vp.p);
  T* Ob = static_cast<T*>(ws.o.p);
  const int64_t ldo = ws.ev_pad;
  T* m = ws.m.data();
  T* l = ws.l.data();

  for (int64_t ip = 0; ip * kMR < bq; ++ip)
    pack_a_panel(Q + ip * kMR * a.q_rs, a.q_rs, int64_t(1), std::min<int64_t>(kMR, bq - ip * kMR), E, Qp + ip * kMR * E);
  std::fill(Ob, Ob + kBq * ldo, T(0));
  std::fill(m, m + kBq, ninf);
  std::fill(l, l + kBq, T(0));

  // Causal: keys past the last query of this block are masked for every row of it.
  const int64_t s_end = a.causal ? std::min(S, q0 + bq) : S;
  const bool has_mask = a.fmask || a.bmask;
  for (int64_t k0 = 0; k0 < s_end; k0 += Bc) {
    const int64_t bc = std::min(Bc, s_end - k0);
    const int64_t kpanels = (bc + NR - 1) / NR;
    // Scores: Sb[i][j] = q_i . k_j, B operand element (e, j) = K[j][e].
    for (int64_t jp = 0; jp < kpanels; ++jp)
      pack_b_panel(K + (k0 + jp * NR) * a.k_rs, int64_t(1), a.k_rs, E, std::min(NR, bc - jp * NR), Kp + jp * NR * E);
    for (int64_t jp = 0; jp < kpanels; ++jp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        micro_kernel<T>(E, Qp + ip * kMR * E, 1, kMR, Kp + jp * NR * E, Sb + ip * kMR * Bc + jp * NR, Bc,
                        std::min<int64_t>(kMR, bq - ip * kMR), std::min(NR, bc - jp * NR), false, nullptr, false);
    // Scale, mask, and the online softmax update of each row.
    for (int64_t i = 0; i < bq; ++i) {
      T* s = Sb + i * Bc;
      const int64_t qi = q0 + i;
      int64_t jend = bc;
      if (a.causal) jend = std::max<int64_t>(0, std::min(bc, qi - k0 + 1));
      for (int64_t j = 0; j < jend; ++j) s[j] *= a.scale;
      for (int64_t j = jend; j < bc; ++j) s[j] = ninf;
      if (has_mask) {
        const int64_t mo = a.m_off[b] + qi * a.m_rs + k0 * a.m_cs;
        if (a.fmask) {
          for (int64_t j = 0; j < jend; ++j) s[j] += a.fmask[mo + j * a.m_cs];
        } else {
          for (int64_t j = 0; j < jend; ++j)
            if (!a.bmask[mo + j * a.m_cs]) s[j] = ninf;
        }
      }
      // Row max that propagates NaN (a NaN score must make the row NaN, not look like "no key").
      auto nanmax = [](T x, T y) { return (y != y || y > x) ? y : x; };
      T mx = ninf;
      for (int64_t j = 0; j < bc; ++j) mx = nanmax(mx, s[j]);
      const T m_new = nanmax(m[i], mx);
      T* p = Pp + (i / kMR) * kMR * Bc + (i % kMR);  // P packed as A panels: (row i, key j) at j * kMR
      if (m_new == ninf) {  // nothing allowed yet for this row
        for (int64_t j = 0; j < Bc; ++j) p[j * kMR] = T(0);
        continue;
      }
      const T alpha = std::exp(m[i] - m_new);  // exp(-inf) = 0 on the first allowed block
      T sum = 0;
      int64_t j = 0;
      const Vec<T> mv = vset<T>(m_new);
      for (; j + W <= bc; j += W) {
        Vec<T> e = vexp(vload(s + j) - mv);
        for (int64_t t = 0; t < W; ++t) p[(j + t) * kMR] = e[t];
        sum += hsum(e);
      }
      for (; j < bc; ++j) {
        const T e = std::exp(s[j] - m_new);
        p[j * kMR] = e;
        sum += e;
      }
      for (; j < Bc; ++j) p[j * kMR] = T(0);
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
      if (alpha != T(1)) {
        T* o = Ob + i * ldo;
        for (int64_t c = 0; c < Ev; ++c) o[c] *= alpha;
      }
    }
    for (int64_t i = bq; i < round_up(bq, kMR); ++i) {  // padded rows of the last panel
      T* p = Pp + (i / kMR) * kMR * Bc + (i % kMR);
      for (int64_t j = 0; j < Bc; ++j) p[j * kMR] = T(0);
    }
    // O += P V over this key block (kc = Bc; keys past bc have p = 0 and zero-padded V rows).
    const int64_t vpanels = (Ev + NR - 1) / NR;
    for (int64_t cp = 0; cp < vpanels; ++cp) {
      T* dst = Vp + cp * NR * Bc;
      pack_b_panel(V + k0 * a.v_rs + cp * NR, a.v_rs, int64_t(1), bc, std::min(NR, Ev - cp * NR), dst);
      std::fill(dst + bc * NR, dst + Bc * NR, T(0));
    }
    for (int64_t cp = 0; cp < vpanels; ++cp)
      for (int64_t ip = 0; ip * kMR < bq; ++ip)
        micro_kernel<T>(Bc, Pp + ip * kMR * Bc, 1, kMR, Vp + cp * NR * Bc, Ob + ip * kMR * ldo + cp * NR, ldo,
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
  parallel_items(tasks, [&](int64_t t) {
    // Largest blocks first when causal: later query blocks see more keys.
    const int64_t qb = a.causal ? qblocks - 1 - t % qblocks : t % qblocks;
    sdpa_block(a, t / qblocks, qb * kBq, *ws[thread_index()]);
  });
}

template void sdpa<float>(const SdpaArgs<float>&);
template void sdpa<double>(const SdpaArgs<double>&);

}  // namespace fastnn::cpu::FASTNN_ISA
