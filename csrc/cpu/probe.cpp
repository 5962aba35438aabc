// Machine-limit probes for the benchmark (compiled per ISA like the kernels, so the peak is measured with
// the vector width in use): the FMA peak from independent register-resident FMA chains, and the memory
// bandwidth of the access patterns the kernels use (copy, in-place read+write, Adam's 4 reads/3 writes)
// on arrays far beyond the last-level cache.
#include <chrono>
#include <memory>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

namespace {

using Clock = std::chrono::steady_clock;

// Vector registers of the ISA: 32 ZMM with AVX-512, 16 YMM with AVX2, 16 XMM on baseline x86-64 (SSE2).
#if defined(FASTNN_ISA_avx512)
constexpr int kVecRegisters = 32;
#else
constexpr int kVecRegisters = 16;
#endif
// Independent accumulator chains: enough to hide the FMA latency (4-5 cycles) on 2 pipes (>= 10 chains;
// the generic path's mul + add chain needs more, 12 cover most of it), and few enough that every chain,
// the two operands and a spare stay in registers. More chains than registers spill to the stack, and the
// loop then measures store-to-load latency instead of FMA throughput (16 chains on AVX2 did: the "peak"
// came out below what the matmul reaches). AVX-512: 16 chains of 32 registers; AVX2 / SSE2: 12 of 16.
constexpr int kChains = kVecRegisters == 32 ? 16 : 12;
static_assert(kChains + 2 < kVecRegisters, "the probe's chains must fit in the vector registers");

// Out of line: its loop is the one tools/check_isa_objects.py checks for spills (inlined into the pool
// call, the caller's own loops would be mixed in).
template <typename T> __attribute__((noinline)) double fma_seconds(int64_t iters, T* sink) {
  constexpr int A = kChains;
  Vec<T> acc[A];
#pragma GCC unroll 16
  for (int a = 0; a < A; ++a) acc[a] = vset<T>(T(a) * T(1e-3));
  const Vec<T> x = vset<T>(T(0.999999)), y = vset<T>(T(1e-7));
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) acc[a] = acc[a] * x + y;
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  Vec<T> t = acc[0];
#pragma GCC unroll 16
  for (int a = 1; a < A; ++a) t += acc[a];
  *sink = hsum(t);
  return s;
}

template <typename T> double peak_gflops(int nt) {
  constexpr int A = kChains;
  // Many short repeats (~1.5 ms each), the best kept: on a busy machine one of them runs without being
  // preempted, where three long ones (as before) all were; the first ones also warm the clocks.
  const int64_t iters = int64_t(1) << 20;
  std::vector<double> secs(nt, 0.0);
  std::vector<T> sink(nt * 16);
  for (int rep = 0; rep < 20; ++rep) {
    parallel_items(nt, nt, [&](int64_t t) {
      const double s = fma_seconds<T>(iters, &sink[t * 16]);
      if (rep == 0 || s < secs[t]) secs[t] = s;
    });
  }
  double total = 0;
  for (int t = 0; t < nt; ++t) total += 2.0 * A * kLanes<T> * iters / secs[t];
  return total / 1e9;
}

}  // namespace

double probe_peak_gflops(int threads, int kind) {
  if (kind == kPeakBf16Dot) return 0;  // this path has no bf16 dot product (gemm_bf16.cpp's has)
  return kind == kPeakF64 ? peak_gflops<double>(threads) : peak_gflops<float>(threads);
}

// pattern 0: copy b = a; 1: in place a = a * c; 2: Adam-like p, m, v updated from g (4 reads, 3 writes).
// Returns GB/s (bytes read + written once), the best of `reps` passes after a first-touch pass.
double probe_bandwidth_gbs(int pattern, int threads, int64_t bytes, int reps) {
  const int arrays = pattern == 0 ? 2 : pattern == 1 ? 1 : 4;
  const int64_t n = bytes / int64_t(sizeof(float)) / arrays / 1024 * 1024;
  std::vector<std::unique_ptr<float[]>> buf;
  for (int i = 0; i < arrays; ++i) buf.emplace_back(new float[n]);
  float* a = buf[0].get();
  float* b = arrays > 1 ? buf[1].get() : nullptr;
  float* c = arrays > 2 ? buf[2].get() : nullptr;
  float* d = arrays > 3 ? buf[3].get() : nullptr;
  const int64_t traffic = pattern == 0 ? 2 * n : pattern == 1 ? 2 * n : 7 * n;
  double best = 0;
  for (int rep = 0; rep <= reps; ++rep) {
    const auto t0 = Clock::now();
    parallel_items(threads, threads, [&](int64_t t) {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      constexpr int64_t W = kLanes<float>;
      if (rep == 0) {  // first touch, on the thread that will use the pages
        for (int i = 0; i < arrays; ++i)
          for (int64_t j = lo; j < hi; ++j) buf[i][j] = 1.0f;
      } else if (pattern == 0) {
        for (int64_t j = lo; j + W <= hi; j += W) vstore(b + j, vload(a + j));
      } else if (pattern == 1) {
        for (int64_t j = lo; j + W <= hi; j += W) vstore(a + j, vload(a + j) * 0.5f);
      } else {
        for (int64_t j = lo; j + W <= hi; j += W) {
          const Vec<float> g = vload(b + j);
          const Vec<float> m = vload(c + j) * 0.9f + g * 0.1f;
          const Vec<float> v = vload(d + j) * 0.999f + g * g * 0.001f;
          vstore(c + j, m);
          vstore(d + j, v);
          vstore(a + j, vload(a + j) - m / (v + 1e-8f));
        }
      }
    });
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (rep > 0) best = std::max(best, double(traffic) * sizeof(float) / s / 1e9);
  }
  return best;
}

}  // namespace fastnn::cpu::FASTNN_ISA
