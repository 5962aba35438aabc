// ReLU forward and backward: streaming, vectorized, split across threads in large contiguous chunks.
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

// Below this many elements a second thread costs more than it saves.
constexpr int64_t kElementwiseGrain = 1 << 16;

template <typename T> void relu(const T* x, T* y, int64_t n) {
  parallel_for(n, kElementwiseGrain, [&](int64_t b, int64_t e) {
    constexpr int64_t W = kLanes<T>;
    int64_t i = b;
    for (; i + 4 * W <= e; i += 4 * W) {
      Vec<T> v0 = vload(x + i), v1 = vload(x + i + W), v2 = vload(x + i + 2 * W), v3 = vload(x + i + 3 * W);
      vstore(y + i, vrelu(v0));
      vstore(y + i + W, vrelu(v1));
      vstore(y + i + 2 * W, vrelu(v2));
      vstore(y + i + 3 * W, vrelu(v3));
    }
    for (; i + W <= e; i += W) vstore(y + i, vrelu(vload(x + i)));
    for (; i < e; ++i) y[i] = x[i] < T(0) ? T(0) : x[i];
  });
}

template <typename T> void relu_backward(const T* g, const T* x, T* out, int64_t n) {
  parallel_for(n, kElementwiseGrain, [&](int64_t b, int64_t e) {
    constexpr int64_t W = kLanes<T>;
    int64_t i = b;
    for (; i + W <= e; i += W) {
      Vec<T> xv = vload(x + i), gv = vload(g + i);
      vstore(out + i, xv > Vec<T>{} ? gv : Vec<T>{});
    }
    for (; i < e; ++i) out[i] = x[i] > T(0) ? g[i] : T(0);
  });
}

template void relu<float>(const float*, float*, int64_t);
template void relu<double>(const double*, double*, int64_t);
template void relu_backward<float>(const float*, const float*, float*, int64_t);
template void relu_backward<double>(const double*, const double*, double*, int64_t);

}  // namespace fastnn::cpu::FASTNN_ISA
