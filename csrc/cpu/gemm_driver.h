// The packed, cache-blocked GEMM driver (the BLIS loop structure), shared by every panel format:
//   for jc in N by NC:  for pc in K by KC:  pack B[pc, jc] -> Bp (KC x NR panels, L3/L2)
//                                          pack A[:, pc]  -> Ap (MR x KC panels)
//     parallel over (MC row block x NR panel chunk) tasks:  for jr: for ir: micro-kernel MR x NR
// A panel format (Pn) says how the operands are packed and multiplied:
//   P                 the packed element type
//   NR                columns per B panel
//   KC                the K block (the packed B panel, KC x NR, is sized for L1)
//   depth(kc)         packed elements per panel row along K (kc, or kc rounded up to whole pairs)
//   pack_a(A, a_rs, a_cs, rows, kc, dst), pack_b(B, b_rs, b_cs, kc, cols, dst): one panel, zero-padded
//   kernel(kc, a, a_rs, a_cs, b, c, ldc, mr, nr, accumulate, bias, relu): one MR x NR tile of C; a is a
//                     packed A panel (a_rs, a_cs) = (1, kMR), or a row-major A read in place (lda, 1)
//                     when the operands are already P (then P is T)
//   usable()          checked after each block is packed: false makes the product give up (the caller
//                     then computes it another way; C is left partly written)
// Packing reads any strides (transposed, negative, Fortran views), so there is no slow path for views;
// edge tiles are zero-padded in the packed panels and clipped when stored. Bias and ReLU are applied in
// the micro-kernel's store on the last K block, while the tile is still in registers.
#pragma once
#include <algorithm>
#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/gemm_kernel.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace fastnn::cpu::FASTNN_ISA {

template <class Pn, typename T> struct GemmWorkspace {
  using P = typename Pn::P;
  AlignedBuffer a, b, bias;
  // Sized for this product (not the maximal blocks): small products stay off mmap'd allocations.
  GemmWorkspace(int64_t M, int64_t N, int64_t K, bool with_bias)
      : a(sizeof(P) * round_up(std::max<int64_t>(M, 1), kMR) * Pn::depth(std::clamp<int64_t>(K, 1, Pn::KC))),
        b(sizeof(P) * Pn::depth(std::clamp<int64_t>(K, 1, Pn::KC)) *
          round_up(std::min(std::max<int64_t>(N, 1), kNC), Pn::NR)),
        bias(with_bias ? sizeof(T) * round_up(N, Pn::NR) : 0) {}
};

// K == 0: C = relu(0 + bias).
template <typename T> void gemm_fill_empty_k(const GemmArgs<T>& g, T* C) {
  for (int64_t i = 0; i < g.M; ++i)
    for (int64_t j = 0; j < g.N; ++j) {
      T r = g.bias ? g.bias[j] : T(0);
      if (g.relu) r = r < T(0) ? T(0) : r;  // NaN kept (NaN < 0 is false), as np.maximum
      C[i * g.ldc + j] = r;
    }
}

// One product C = A @ B with up to nt threads (nt == 1 when the caller parallelizes over the batch).
// S: the element type of A and B as stored. Returns false when the panel format gave up (pn.usable()).
template <class Pn, typename T, typename S>
bool gemm_one(const GemmArgs<T>& g, const S* A, const S* B, T* C, GemmWorkspace<Pn, T>& ws, int nt, Pn& pn) {
  using P = typename Pn::P;
  const int64_t M = g.M, N = g.N, K = g.K;
  constexpr int64_t NR = Pn::NR;
  if (M == 0 || N == 0) return true;
  if (K == 0) return gemm_fill_empty_k(g, C), true;
  P* Ap = static_cast<P*>(ws.a.p);
  P* Bp = static_cast<P*>(ws.b.p);
  T* bias_pad = static_cast<T*>(ws.bias.p);
  if (g.bias) {
    std::copy(g.bias, g.bias + N, bias_pad);
    std::fill(bias_pad + N, bias_pad + round_up(N, NR), T(0));
  }
  const int64_t m_panels = (M + kMR - 1) / kMR;
  // Row blocks of at most kMC rows and of equal size to within a panel; when there are several, as many
  // as a multiple of the threads (when there are enough panels): thread imbalance limited the scaling
  // (1024 rows as 5 x 192 + 64 ran 1.68x faster on 2 threads; 256 rows as 192 + 64, 1.34x). A single
  // block stays whole and the threads split the N panels instead (each then reads the B panels it packed).
  int64_t m_blocks = (m_panels + kMC / kMR - 1) / (kMC / kMR);
  if (nt > 1 && m_blocks > 1) m_blocks = std::min(m_panels, round_up(m_blocks, nt));
  // A already in the packed type with unit column stride is read in place by the micro-kernel (full
  // panels); only a partial last panel is packed (zero-padded rows). Other layouts are packed.
  constexpr bool kSameType = std::is_same_v<S, P>;
  const bool direct_a = kSameType && g.a_cs == 1;
  const int64_t a_pack_first = direct_a ? M / kMR : 0;
  // Per (N block, K block): the panels are packed in parallel, then the (row block x N chunk) tasks run in
  // parallel; each parallel call returns when its pieces are done (the barrier between the phases).
  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc);
    const int64_t n_panels = (nc + NR - 1) / NR;
    // Split the N panels so that there are at least ~2 tasks per thread when M gives few row blocks.
    const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_panels, (2 * nt + m_blocks - 1) / m_blocks));
    const int64_t tasks = m_blocks * n_chunks;
    const int64_t a_packs = m_panels - a_pack_first;
    // K blocks of equal size (at most KC): 784 = 4 x 196, not 3 x 256 + 16 (a short last block costs
    // a full pass over C for little work).
    const int64_t kblocks = (K + Pn::KC - 1) / Pn::KC, kstep = (K + kblocks - 1) / kblocks;
    for (int64_t pc = 0; pc < K; pc += kstep) {
      const int64_t kc = std::min(kstep, K - pc), kd = Pn::depth(kc);
      const bool last = pc + kc == K;
      // Packed A panels for this K block sit at Ap[panel * kMR * kd].
      parallel_ranges(n_panels + a_packs, nt, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          if (p < n_panels) {
            const int64_t j0 = p * NR;
            pn.pack_b(B + pc * g.b_rs + (jc + j0) * g.b_cs, g.b_rs, g.b_cs, kc, std::min(NR, nc - j0),
                      Bp + p * NR * kd);
          } else {
            const int64_t ip = a_pack_first + p - n_panels, i0 = ip * kMR;
            pn.pack_a(A + i0 * g.a_rs + pc * g.a_cs, g.a_rs, g.a_cs, std::min<int64_t>(kMR, M - i0), kc,
                      Ap + ip * kMR * kd);
          }
        }
      });
      if (!pn.usable()) return false;
      // flatten: the micro-kernel is inlined into the tile loop (and specialized for the two A layouts),
      // as it was before the loop became a lambda; out of line, 1024^3 ran ~25% slower.
      parallel_items(tasks, nt, [&](int64_t t) __attribute__((flatten)) {
        const int64_t mb = t / n_chunks, ch = t % n_chunks;
        const int64_t jp0 = n_panels * ch / n_chunks, jp1 = n_panels * (ch + 1) / n_chunks;
        const int64_t ip0 = m_panels * mb / m_blocks, ip1 = m_panels * (mb + 1) / m_blocks;
        for (int64_t jp = jp0; jp < jp1; ++jp) {
          const int64_t j = jp * NR;
          const int64_t nr = std::min(NR, nc - j);
          for (int64_t ip = ip0; ip < ip1; ++ip) {
            const int64_t i = ip * kMR;
            const bool in_place = ip < a_pack_first;
            const P* a = Ap + ip * kMR * kd;
            if constexpr (kSameType) a = in_place ? A + i * g.a_rs + pc : a;
            pn.kernel(kc, a, in_place ? g.a_rs : 1, in_place ? 1 : kMR, Bp + jp * NR * kd, C + i * g.ldc + jc + j,
                      g.ldc, std::min<int64_t>(kMR, M - i), nr, pc > 0, last && g.bias ? bias_pad + jc + j : nullptr,
                      last && g.relu);
          }
        }
      });
    }
  }
  return true;
}

// Threads worth using for one M x N x K product: about 2^20 multiply-adds per thread at least.
inline int gemm_threads_for(int64_t M, int64_t N, int64_t K) {
  const double work = double(M) * double(N) * double(std::max<int64_t>(K, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), int64_t(work / (1 << 20)))));
}

// Every product of g (A and B of element type S read from A0, B0, with g's strides and offsets) in panel
// format Pn. Returns false when the format gave up on any product (the others may be written or not).
template <class Pn, typename T, typename S> bool gemm_batched(const GemmArgs<T>& g, const S* A0, const S* B0) {
  if (g.batch <= 0 || g.M == 0 || g.N == 0) return true;
  auto a_of = [&](int64_t b) { return A0 + (g.a_off ? g.a_off[b] : 0); };
  auto b_of = [&](int64_t b) { return B0 + (g.b_off ? g.b_off[b] : 0); };
  const int nt_one = gemm_threads_for(g.M, g.N, g.K);
  const int nt = num_threads();
  if (g.batch == 1 || nt_one >= nt || nt == 1) {
    // Each product uses the threads; buffers are allocated before any parallel region (bad_alloc must
    // reach Python as MemoryError, not escape a parallel region).
    GemmWorkspace<Pn, T> ws(g.M, g.N, g.K, g.bias != nullptr);
    Pn pn;
    for (int64_t b = 0; b < g.batch; ++b)
      if (!gemm_one(g, a_of(b), b_of(b), g.C + b * g.c_bs, ws, nt_one, pn)) return false;
    return true;
  }
  // Many small products: one thread each, a workspace per thread.
  const int64_t teams = std::min<int64_t>(nt, g.batch);
  std::vector<std::unique_ptr<GemmWorkspace<Pn, T>>> ws;
  for (int64_t t = 0; t < teams; ++t) ws.emplace_back(new GemmWorkspace<Pn, T>(g.M, g.N, g.K, g.bias != nullptr));
  std::atomic<bool> ok{true};
  parallel_for(teams, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      Pn pn;
      for (int64_t b = g.batch * t / teams; b < g.batch * (t + 1) / teams; ++b)
        if (!ok.load(std::memory_order_relaxed) || !gemm_one(g, a_of(b), b_of(b), g.C + b * g.c_bs, *ws[t], 1, pn)) {
          ok.store(false, std::memory_order_relaxed);
          break;
        }
    }
  });
  return ok.load();
}

}  // namespace fastnn::cpu::FASTNN_ISA
