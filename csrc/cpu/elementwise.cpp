// ReLU forward and backward: streaming, vectorized, split across threads in large contiguous chunks.
// Out-of-place results larger than the caches are written with non-temporal stores: they skip the
// read-for-ownership of the destination (a third of the traffic of a copy-like op) and leave the
// cache to the inputs.
#include <algorithm>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

// Below this many elements a second thread costs more than it saves.
constexpr int64_t kElementwiseGrain = 1 << 16;

// y[i] = f(x0[i], x1[i]) over [b, e) (x1 unused by unary f); y may equal x0 or x1 (in place).
template <typename T, typename F>
static inline void map_range(const T* x0, const T* x1, T* y, int64_t b, int64_t e, bool stream, F f) {
  constexpr int64_t W = kLanes<T>;
  int64_t i = b;
  // Peel to a vector-aligned output: NumPy's buffers are 16-byte aligned, and a misaligned 64-byte
  // access splits a cache line every time (the inputs, allocated alike, usually align with it).
  for (; i < e && (reinterpret_cast<uintptr_t>(y + i) % sizeof(Vec<T>)); ++i) y[i] = f(x0[i], x1 ? x1[i] : T(0));
  if (stream) {
    for (; i + 2 * W <= e; i += 2 * W) {
      const Vec<T> a0 = vload(x0 + i), a1 = vload(x0 + i + W);
      const Vec<T> b0 = x1 ? vload(x1 + i) : Vec<T>{}, b1 = x1 ? vload(x1 + i + W) : Vec<T>{};
      vstore_stream(y + i, f(a0, b0));
      vstore_stream(y + i + W, f(a1, b1));
    }
  }
  for (; i + 4 * W <= e; i += 4 * W) {
    Vec<T> r[4];
    for (int u = 0; u < 4; ++u) r[u] = f(vload(x0 + i + u * W), x1 ? vload(x1 + i + u * W) : Vec<T>{});
    for (int u = 0; u < 4; ++u) vstore(y + i + u * W, r[u]);
  }
  for (; i + W <= e; i += W) vstore(y + i, f(vload(x0 + i), x1 ? vload(x1 + i) : Vec<T>{}));
  for (; i < e; ++i) y[i] = f(x0[i], x1 ? x1[i] : T(0));
}

template <typename T, typename F> static void map(const T* x0, const T* x1, T* y, int64_t n, F f) {
  const bool stream = y != x0 && y != x1 && n * int64_t(sizeof(T)) >= kStreamBytes;
  parallel_for(n, kElementwiseGrain, [=](int64_t b, int64_t e) { map_range(x0, x1, y, b, e, stream, f); });
  if (stream) stream_fence();
}

template <typename T> void relu(const T* x, T* y, int64_t n) {
  // x < 0 ? 0 : x keeps NaN (NaN < 0 is false), as np.maximum(x, 0).
  map<T>(x, nullptr, y, n, [](auto a, auto) { return a < decltype(a){} ? decltype(a){} : a; });
}

template <typename T> void relu_backward(const T* g, const T* x, T* out, int64_t n) {
  // grad where x > 0, else 0, also where x is NaN: deliberately not propagated (the forward already made
  // that activation NaN; the gradient of max(x, 0) at NaN is taken as 0, as jax.nn.relu does).
  map<T>(x, g, out, n, [](auto xv, auto gv) { return xv > decltype(xv){} ? gv : decltype(xv){}; });
}

// exp through this ISA's vexp for every element (tail included), for the tests of its accuracy.
template <typename T> void exp_array(const T* x, T* y, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  parallel_for(n, kElementwiseGrain, [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += W) {
      const int64_t k = std::min<int64_t>(W, e - i);
      vstore_part(y + i, vexp(vload_part(x + i, k, T(0))), k);
    }
  });
}

template void relu<float>(const float*, float*, int64_t);
template void relu<double>(const double*, double*, int64_t);
template void relu_backward<float>(const float*, const float*, float*, int64_t);
template void relu_backward<double>(const double*, const double*, double*, int64_t);
template void exp_array<float>(const float*, float*, int64_t);
template void exp_array<double>(const double*, double*, int64_t);

}  // namespace fastnn::cpu::FASTNN_ISA
