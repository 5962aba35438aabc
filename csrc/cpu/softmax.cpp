// Softmax family over contiguous rows: softmax, log_softmax, their backward, and the fused cross-entropy.
// Per row: pass 1 finds the max, pass 2 computes exp(x - max) with the vectorized exp (storing it for
// softmax) and sums it, pass 3 normalizes; a row is re-read from L1/L2, not from memory.
#include <cmath>
#include <vector>

#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

// Rows are handed to threads in groups of at least this many elements.
constexpr int64_t kRowGrainElems = 1 << 15;

static int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrainElems / std::max<int64_t>(cols, 1)); }

template <typename T> static T row_max(const T* x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  int64_t i = 0;
  T m = -__builtin_inf();
  if (n >= 2 * W) {
    Vec<T> m0 = vload(x), m1 = vload(x + W);
    for (i = 2 * W; i + 2 * W <= n; i += 2 * W) {
      m0 = vmax(m0, vload(x + i));
      m1 = vmax(m1, vload(x + i + W));
    }
    m = hmax(vmax(m0, m1));
  }
  for (; i < n; ++i) m = smax(m, x[i]);
  // A NaN anywhere makes the row NaN below (x - max is NaN there), whichever max this returns.
  return m;
}

// sum(exp(x - m)), writing exp(x - m) to y when y is not null.
template <typename T> static T row_exp_sum(const T* x, T* y, int64_t n, T m) {
  constexpr int64_t W = kLanes<T>;
  const Vec<T> mv = vset<T>(m);
  Vec<T> s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    Vec<T> e0 = vexp(vload(x + i) - mv), e1 = vexp(vload(x + i + W) - mv);
    if (y) {
      vstore(y + i, e0);
      vstore(y + i + W, e1);
    }
    s0 += e0;
    s1 += e1;
  }
  if (i < n) {  // tail: padded with -inf, whose exp is 0
    for (; i < n; i += W) {
      const int64_t k = std::min<int64_t>(W, n - i);
      Vec<T> e = vexp(vload_part(x + i, k, T(-__builtin_inf())) - mv);
      if (y) vstore_part(y + i, e, k);
      s0 += e;
    }
  }
  return hsum(s0 + s1);
}

template <typename T> static void row_scale(T* y, int64_t n, T s) {
  constexpr int64_t W = kLanes<T>;
  const Vec<T> sv = vset<T>(s);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(y + i, vload(y + i) * sv);
  for (; i < n; ++i) y[i] *= s;
}

// y = (x - m) - ls. Not x - (m + ls): for |m| large next to ls (1e30 in float32), m + ls rounds to m.
template <typename T> static void row_sub(const T* x, T* y, int64_t n, T m, T ls) {
  constexpr int64_t W = kLanes<T>;
  const Vec<T> mv = vset<T>(m), lv = vset<T>(ls);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(y + i, (vload(x + i) - mv) - lv);
  for (; i < n; ++i) y[i] = (x[i] - m) - ls;
}

template <typename T> void softmax(const T* x, T* y, int64_t rows, int64_t cols, bool log) {
  parallel_for(rows, row_grain(cols), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      const T m = row_max(xr, cols);
      if (log) {
        const T s = row_exp_sum<T>(xr, nullptr, cols, m);
        row_sub(xr, yr, cols, m, std::log(s));
      } else {
        const T s = row_exp_sum(xr, yr, cols, m);
        row_scale(yr, cols, T(1) / s);
      }
    }
  });
}

template <typename T> static T row_dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  Vec<T> s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 += vload(a + i) * vload(b + i);
    s1 += vload(a + i + W) * vload(b + i + W);
  }
  T s = hsum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T> static T row_sum(const T* a, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  Vec<T> s0{};
  int64_t i = 0;
  for (; i + W <= n; i += W) s0 += vload(a + i);
  T s = hsum(s0);
  for (; i < n; ++i) s += a[i];
  return s;
}

template <typename T> void softmax_backward(const T* g, const T* y, T* out, int64_t rows, int64_t cols, bool log) {
  parallel_for(rows, row_grain(cols), [&](int64_t rb, int64_t re) {
    constexpr int64_t W = kLanes<T>;
    for (int64_t r = rb; r < re; ++r) {
      const T* gr = g + r * cols;
      const T* yr = y + r * cols;
      T* o = out + r * cols;
      int64_t i = 0;
      if (log) {  // d log_softmax: g - exp(y) * sum(g)
        const Vec<T> sv = vset<T>(row_sum(gr, cols));
        for (; i + W <= cols; i += W) vstore(o + i, vload(gr + i) - vexp(vload(yr + i)) * sv);
        for (; i < cols; ++i) o[i] = gr[i] - std::exp(yr[i]) * sv[0];
      } else {  // d softmax: y * (g - sum(g * y))
        const T d = row_dot(gr, yr, cols);
        const Vec<T> dv = vset<T>(d);
        for (; i + W <= cols; i += W) vstore(o + i, vload(yr + i) * (vload(gr + i) - dv));
        for (; i < cols; ++i) o[i] = yr[i] * (gr[i] - d);
      }
    }
  });
}

template <typename T>
double cross_entropy(const T* logits, const int64_t* labels, T* grad, int64_t rows, int64_t cols, T grad_scale) {
  const int64_t grain = row_grain(cols);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads(), rows / grain));
  std::vector<double> partial(static_cast<size_t>(nt) * 8, 0.0);  // 8 apart: no false sharing
  // Rows are split into nt fixed blocks so the sum does not depend on the OpenMP schedule.
  parallel_for(nt, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      double loss = 0;
      for (int64_t r = rows * t / nt; r < rows * (t + 1) / nt; ++r) {
        const T* xr = logits + r * cols;
        T* gr = grad + r * cols;
        const T m = row_max(xr, cols);
        const T s = row_exp_sum(xr, gr, cols, m);
        // (m - x[label]) + log(s): m + log(s) first would lose log(s) next to a large m.
        loss += (double(m) - double(xr[labels[r]])) + double(std::log(s));
        row_scale(gr, cols, grad_scale / s);
        gr[labels[r]] -= grad_scale;
      }
      partial[static_cast<size_t>(t) * 8] = loss;
    }
  });
  double total = 0;
  for (int64_t t = 0; t < nt; ++t) total += partial[static_cast<size_t>(t) * 8];
  return total;
}

template void softmax<float>(const float*, float*, int64_t, int64_t, bool);
template void softmax<double>(const double*, double*, int64_t, int64_t, bool);
template void softmax_backward<float>(const float*, const float*, float*, int64_t, int64_t, bool);
template void softmax_backward<double>(const double*, const double*, double*, int64_t, int64_t, bool);
template double cross_entropy<float>(const float*, const int64_t*, float*, int64_t, int64_t, float);
template double cross_entropy<double>(const double*, const int64_t*, double*, int64_t, int64_t, double);

}  // namespace fastnn::cpu::FASTNN_ISA
