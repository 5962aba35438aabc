// The float32 / float64 GEMM: the shared driver (gemm_driver.h) with the register-tiled micro-kernel of
// gemm_kernel.h on panels of T; float16 / bfloat16 operands are widened to float32 while packing.
#include <algorithm>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/gemm_driver.h"
#include "cpu/gemm_kernel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

// Panels of T (NRV vectors wide), packed from elements of type S (T, or a 16-bit type widened to T).
template <typename T, int NRV, typename S> struct WidePanels {
  using P = T;
  static constexpr int64_t NR = NRV * kLanes<T>, KC = kKC<T>;
  static constexpr int64_t depth(int64_t kc) { return kc; }
  void pack_a(const S* A, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, T* dst) {
    pack_a_panel(A, a_rs, a_cs, rows, kc, dst);
  }
  void pack_b(const S* B, int64_t b_rs, int64_t b_cs, int64_t kc, int64_t cols, T* dst) {
    pack_b_panel<T, NRV, S>(B, b_rs, b_cs, kc, cols, dst);
  }
  FASTNN_INLINE void kernel(int64_t kc, const T* a, int64_t a_rs, int64_t a_cs, const T* b, T* c, int64_t ldc,
                            int64_t mr, int64_t nr, bool accumulate, const T* bias, bool relu) {
    micro_kernel<T, NRV>(kc, a, a_rs, a_cs, b, NR, c, ldc, mr, nr, accumulate, bias, relu);
  }
  static constexpr bool usable() { return true; }
};

// Narrow products (N up to one vector) use one-vector panels: half the padding of the default two.
template <typename T, typename S> void gemm_from(const GemmArgs<T>& g, const S* A, const S* B) {
  if (g.N <= kLanes<T>)
    gemm_batched<WidePanels<T, 1, S>>(g, A, B);
  else
    gemm_batched<WidePanels<T, kNRV, S>>(g, A, B);
}

}  // namespace

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
