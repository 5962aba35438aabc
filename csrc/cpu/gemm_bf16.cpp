// The avx512bf16 path: bfloat16 products on the AVX512-BF16 pair dot product (vdpbf16ps: two bf16
// products per float32 lane, accumulated in float32, twice the multiply rate of the float32 FMA), on
// panels that keep the operands at 16 bits, packed in K pairs. Every other kernel of this path is the
// avx512 path's (this unit's table is avx512's with the bf16 matmul and attention, sdpa_bf16.cpp, replaced).
//
// vdpbf16ps treats subnormal inputs as zero, flushes subnormal results to zero and may round an
// overflowing product differently from a float32 FMA. So that special values and tiny numbers follow IEEE, a
// product takes this path only when every nonzero input magnitude lies in [2^-55, 2^63): then each
// product lies in [2^-110, 2^126), every partial sum is zero or at least 2^-124 (in-range bf16 values
// are multiples of 2^-62, so products are multiples of 2^-124), and nothing overflows before the sum itself would. Packing checks each
// element on the way (one compare); a product with an element outside the range (subnormal, tiny, huge,
// inf, NaN) is computed again on the widening avx512 path, whose float32 FMAs follow IEEE exactly.
#include <atomic>
#include <chrono>
#include <cstring>
#include <vector>

#include "cpu/bf16_pairs.h"
#include "cpu/gemm_driver.h"
#include "cpu/gemm_kernel.h"
#include "cpu/half.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

void gemm_half(const GemmArgs<float>& g, const uint16_t* A, const uint16_t* B, bool bf16) {
  if (bf16) {
    const Bf16* a = reinterpret_cast<const Bf16*>(A);
    const Bf16* b = reinterpret_cast<const Bf16*>(B);
    // Narrow products (N up to 16) use one-vector panels, as the float32 GEMM does.
    if (g.N <= 16 ? gemm_batched<PairPanels<1>>(g, a, b) : gemm_batched<PairPanels<2>>(g, a, b)) return;
  }
  avx512::kernel_table().half_gemm(g, A, B, bf16);  // float16, or inputs outside the range (see above)
}

// The pair dot product's peak: independent register chains on every thread, as probe.cpp's FMA probe
// (16 chains + 2 operands of the 32 zmm registers); 64 flops per instruction (16 lanes x 2 products x 2).
__attribute__((noinline)) double dot_seconds(int64_t iters, float* sink) {
  constexpr int A = 16;
  __m512 acc[A];
#pragma GCC unroll 16
  for (int a = 0; a < A; ++a) acc[a] = _mm512_set1_ps(float(a) * 1e-3f);
  // x * y = 2^-40: after 2^20 steps each chain has grown by 2^-19, far from overflow or subnormals.
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3580), y = (__m512bh)_mm512_set1_epi16(0x3580);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) acc[a] = _mm512_dpbf16_ps(acc[a], x, y);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m512 t = acc[0];
#pragma GCC unroll 16
  for (int a = 1; a < A; ++a) t = _mm512_add_ps(t, acc[a]);
  *sink = _mm512_reduce_add_ps(t);
  return s;
}

double probe_peak_gflops(int nt, int kind) {
  if (kind != kPeakBf16Dot) return avx512::kernel_table().probe_peak_gflops(nt, kind);
  const int64_t iters = int64_t(1) << 20;
  std::vector<double> secs(nt, 0.0);
  std::vector<float> sink(nt * 16);
  for (int rep = 0; rep < 20; ++rep) {  // short repeats, the best kept (as probe.cpp)
    parallel_items(nt, nt, [&](int64_t t) {
      const double s = dot_seconds(iters, &sink[t * 16]);
      if (rep == 0 || s < secs[t]) secs[t] = s;
    });
  }
  double total = 0;
  for (int t = 0; t < nt; ++t) total += 64.0 * 16 * iters / secs[t];
  return total / 1e9;
}

}  // namespace

// sdpa_bf16.cpp
bool attention_bf16(const SdpaArgs<float>& a, const uint16_t* Q, const uint16_t* K, const uint16_t* V);
bool attention_backward_bf16(const SdpaBackwardArgs<float>& a, const uint16_t* Q, const uint16_t* K, const uint16_t* V,
                             const uint16_t* dO, const uint16_t* O);

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t = avx512::kernel_table();
    t.isa = "avx512bf16";
    t.half_gemm = gemm_half;
    t.probe_peak_gflops = probe_peak_gflops;
    t.bf16_sdpa = attention_bf16;
    t.bf16_sdpa_backward = attention_backward_bf16;
    return t;
  }();
  return table;
}

}  // namespace fastnn::cpu::FASTNN_ISA
