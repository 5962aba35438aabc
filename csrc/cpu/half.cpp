// bfloat16 / float16 <-> float32 over whole arrays, vectorized and threaded (float16 through the F16C
// instructions on avx2/avx512), for the half-precision products, which widen their operands; and ReLU
// forward and backward on the 16-bit patterns themselves (exact: a select needs no arithmetic).
#include <algorithm>

#include "cpu/half.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

constexpr int64_t kConvertGrain = 1 << 16;

void half_widen(const uint16_t* src, float* dst, int64_t n, bool bf16) {
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { widen_range(src, dst, b, e, bf16); });
}

void half_narrow(const float* src, uint16_t* dst, int64_t n, bool bf16) {
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { narrow_range(src, dst, b, e, bf16); });
}

// The sign bit is the top bit in both formats; |h| above the infinity pattern is a NaN. The loops take their
// pointers as arguments: reading them from the shared lambda inside the loop (a store through y might alias
// it) ran 25x slower on two threads than on one (the closure's cache line bouncing between the cores).
static void relu_range(const uint16_t* x, uint16_t* y, int64_t b, int64_t e, uint16_t inf) {
  // x < 0 ? +0 : x, as the float kernel: negative, nonzero and not NaN -> 0; -0 and NaN kept.
  for (int64_t i = b; i < e; ++i) {
    const uint16_t h = x[i], mag = h & 0x7fff;
    y[i] = ((h & 0x8000) && mag != 0 && mag <= inf) ? uint16_t(0) : h;
  }
}

static void relu_backward_range(const uint16_t* g, const uint16_t* x, uint16_t* out, int64_t b, int64_t e,
                                uint16_t inf) {
  // x > 0 ? g : 0: positive, nonzero and not NaN.
  for (int64_t i = b; i < e; ++i) {
    const uint16_t h = x[i], mag = h & 0x7fff;
    out[i] = (!(h & 0x8000) && mag != 0 && mag <= inf) ? g[i] : uint16_t(0);
  }
}

// In place (y == x, out == g or x) is allowed: each element is read before it is written.
void half_relu(const uint16_t* x, uint16_t* y, int64_t n, bool bf16) {
  const uint16_t inf = bf16 ? 0x7f80 : 0x7c00;
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { relu_range(x, y, b, e, inf); });
}

void half_relu_backward(const uint16_t* g, const uint16_t* x, uint16_t* out, int64_t n, bool bf16) {
  const uint16_t inf = bf16 ? 0x7f80 : 0x7c00;
  parallel_for(n, kConvertGrain, [=](int64_t b, int64_t e) { relu_backward_range(g, x, out, b, e, inf); });
}

}  // namespace fastnn::cpu::FASTNN_ISA
