// Packed, cache-blocked GEMM (the BLIS loop structure) with a register-tiled micro-kernel per ISA.
//   for jc in N by NC:  for pc in K by KC:  pack B[pc, jc] -> Bp (KC x NR panels, L3/L2)
//                                          pack A[:, pc]  -> Ap (MR x KC panels)
//     parallel over (MC row block x NR panel chunk) tasks:  for jr: for ir: micro-kernel MR x NR
// Packing reads any strides (transposed, negative, Fortran views), so there is no slow path for views;
// edge tiles are zero-padded in the packed panels and clipped when stored. Bias and ReLU are applied
// in the micro-kernel's store on the last K block, while the tile is still in registers.
#include <algorithm>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/gemm_kernel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

template <typename T> struct Workspace {
  AlignedBuffer a, b, bias;
  // Sized for this product (not the maximal blocks): small products stay off mmap'd allocations.
  Workspace(int64_t M, int64_t N, int64_t K, bool with_bias)
      : a(sizeof(T) * round_up(std::max<int64_t>(M, 1), kMR) * std::clamp<int64_t>(K, 1, kKC)),
        b(sizeof(T) * std::clamp<int64_t>(K, 1, kKC) * round_up(std::min(std::max<int64_t>(N, 1), kNC), kNR<T>)),
        bias(with_bias ? sizeof(T) * round_up(N, kNR<T>) : 0) {}
};

// K == 0: C = relu(0 + bias).
template <typename T> void fill_empty_k(const GemmArgs<T>& g, T* C) {
  for (int64_t i = 0; i < g.M; ++i)
    for (int64_t j = 0; j < g.N; ++j) {
      T r = g.bias ? g.bias[j] : T(0);
      if (g.relu) r = r < T(0) ? T(0) : r;  // NaN kept (NaN < 0 is false), as np.maximum
      C[i * g.ldc + j] = r;
    }
}

// One product C = A @ B with up to nt threads (nt == 1 when the caller parallelizes over the batch).
// S: the element type of A and B (T, or a 16-bit storage type widened to T = float while packing).
template <typename T, int NRV, typename S>
void gemm_one(const GemmArgs<T>& g, const S* A, const S* B, T* C, Workspace<T>& ws, int nt) {
  const int64_t M = g.M, N = g.N, K = g.K;
  constexpr int64_t NR = NRV * kLanes<T>;
  if (M == 0 || N == 0) return;
  if (K == 0) return fill_empty_k(g, C);
  T* Ap = static_cast<T*>(ws.a.p);
  T* Bp = static_cast<T*>(ws.b.p);
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
  // A with unit column stride is read in place by the micro-kernel (full panels); only a partial last
  // panel is packed (zero-padded rows). Other layouts are packed.
  const bool direct_a = std::is_same_v<S, T> && g.a_cs == 1;
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
    // K blocks of equal size (at most kKC): 784 = 4 x 196, not 3 x 256 + 16 (a short last block costs
    // a full pass over C for little work).
    const int64_t kblocks = (K + kKC - 1) / kKC, kstep = (K + kblocks - 1) / kblocks;
    for (int64_t pc = 0; pc < K; pc += kstep) {
      const int64_t kc = std::min(kstep, K - pc);
      const bool last = pc + kc == K;
      // Packed A panels for this K block sit at Ap[panel * kMR * kc].
      parallel_ranges(n_panels + a_packs, nt, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          if (p < n_panels) {
            const int64_t j0 = p * NR;
            pack_b_panel<T, NRV, S>(B + pc * g.b_rs + (jc + j0) * g.b_cs, g.b_rs, g.b_cs, kc, std::min(NR, nc - j0),
                                 Bp + p * NR * kc);
          } else {
            const int64_t ip = a_pack_first + p - n_panels, i0 = ip * kMR;
            pack_a_panel(A + i0 * g.a_rs + pc * g.a_cs, g.a_rs, g.a_cs, std::min<int64_t>(kMR, M - i0), kc,
                         Ap + ip * kMR * kc);
          }
        }
      });
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
            const T* a = Ap + ip * kMR * kc;
            if constexpr (std::is_same_v<S, T>) a = in_place ? A + i * g.a_rs + pc : a;
            micro_kernel<T, NRV>(kc, a, in_place ? g.a_rs : 1, in_place ? 1 : kMR, Bp + jp * NR * kc, NR,
                                 C + i * g.ldc + jc + j, g.ldc, std::min<int64_t>(kMR, M - i), nr, pc > 0,
                                 last && g.bias ? bias_pad + jc + j : nullptr, last && g.relu);
          }
        }
      });
    }
  }
}

// Threads worth using for one M x N x K product: about 2^20 multiply-adds per thread at least.
int threads_for(int64_t M, int64_t N, int64_t K) {
  const double work = double(M) * double(N) * double(std::max<int64_t>(K, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), int64_t(work / (1 << 20)))));
}

}  // namespace

// The product with A and B of element type S read from A0, B0 (g's own A and B when S is T).
template <typename T, typename S> static void gemm_from(const GemmArgs<T>& g, const S* A0, const S* B0) {
  if (g.batch <= 0 || g.M == 0 || g.N == 0) return;
  auto a_of = [&](int64_t b) { return A0 + (g.a_off ? g.a_off[b] : 0); };
  auto b_of = [&](int64_t b) { return B0 + (g.b_off ? g.b_off[b] : 0); };
  // Narrow products (N up to one vector) use one-vector panels: half the padding of the default two.
  auto one = g.N <= kLanes<T> ? gemm_one<T, 1, S> : gemm_one<T, kNRV, S>;
  const int nt_one = threads_for(g.M, g.N, g.K);
  const int nt = num_threads();
  if (g.batch == 1 || nt_one >= nt || nt == 1) {
    // Each product uses the threads; buffers are allocated before any parallel region (bad_alloc must
    // reach Python as MemoryError, not escape a parallel region).
    Workspace<T> ws(g.M, g.N, g.K, g.bias != nullptr);
    for (int64_t b = 0; b < g.batch; ++b) one(g, a_of(b), b_of(b), g.C + b * g.c_bs, ws, nt_one);
    return;
  }
  // Many small products: one thread each, a workspace per thread.
  const int64_t teams = std::min<int64_t>(nt, g.batch);
  std::vector<std::unique_ptr<Workspace<T>>> ws;
  for (int64_t t = 0; t < teams; ++t) ws.emplace_back(new Workspace<T>(g.M, g.N, g.K, g.bias != nullptr));
  parallel_for(teams, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t)
      for (int64_t b = g.batch * t / teams; b < g.batch * (t + 1) / teams; ++b)
        one(g, a_of(b), b_of(b), g.C + b * g.c_bs, *ws[t], 1);
  });
}

template <typename T> void gemm(const GemmArgs<T>& g) { gemm_from(g, g.A, g.B); }

void gemm_half(const GemmArgs<float>& g, const uint16_t* A, const uint16_t* B, bool bf16) {
  if (bf16)
    gemm_from(g, reinterpret_cast<const Bf16*>(A), reinterpret_cast<const Bf16*>(B));
  else
    gemm_from(g, reinterpret_cast<const F16*>(A), reinterpret_cast<const F16*>(B));
}

template <typename T> void gemm_naive(const GemmArgs<T>& g) {
  for (int64_t b = 0; b < g.batch; ++b) {
    const T* A = g.A + (g.a_off ? g.a_off[b] : 0);
    const T* B = g.B + (g.b_off ? g.b_off[b] : 0);
    T* C = g.C + b * g.c_bs;
    for (int64_t i = 0; i < g.M; ++i)
      for (int64_t j = 0; j < g.N; ++j) {
        T s = 0;
        for (int64_t k = 0; k < g.K; ++k) s += A[i * g.a_rs + k * g.a_cs] * B[k * g.b_rs + j * g.b_cs];
        if (g.bias) s += g.bias[j];
        if (g.relu) s = s < T(0) ? T(0) : s;  // NaN kept, as np.maximum
        C[i * g.ldc + j] = s;
      }
  }
}

template void gemm<float>(const GemmArgs<float>&);
template void gemm<double>(const GemmArgs<double>&);
template void gemm_naive<float>(const GemmArgs<float>&);
template void gemm_naive<double>(const GemmArgs<double>&);

}  // namespace fastnn::cpu::FASTNN_ISA
