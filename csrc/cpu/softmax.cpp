// Softmax family over contiguous rows: softmax, log_softmax, their backward, and the fused cross-entropy.
// Per row: pass 1 finds the max (the only pass that reads the row from memory), pass 2 computes
// exp(x - max) with the vectorized exp and sums it, pass 3 writes the normalized row. Large results with
// long rows are written with non-temporal stores (as in elementwise.cpp): the destination is never read,
// which saves a third of the memory traffic; softmax and cross_entropy then keep pass 2's exponentials in
// a per-thread scratch row (L1/L2) instead of the output.
#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <vector>

#include "cpu/half.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

// Rows shorter than this (bytes) are not streamed (see stream_rows), whatever the size of the result.
constexpr int64_t kStreamRowBytes = int64_t(2) << 10;
// Rows up to this many bytes are computed in a scratch buffer (on the stack up to kStackScratchBytes, else
// the heap); longer rows in the output itself.
constexpr int64_t kScratchBytes = int64_t(512) << 10;
constexpr int64_t kStackScratchBytes = int64_t(8) << 10;

// A scratch buffer of n elements for one thread's chunk of rows: on the stack when small, else from the
// heap; null when it would be too large or the allocation fails (the caller then works in the output).
template <typename T> class Scratch {
 public:
  explicit Scratch(int64_t n) {
    const int64_t bytes = n * int64_t(sizeof(T));
    if (n <= 0) {
      ptr_ = nullptr;
    } else if (bytes <= kStackScratchBytes) {
      ptr_ = stack_;
    } else if (bytes <= kScratchBytes) {
      heap_.reset(new (std::nothrow) T[static_cast<size_t>(n)]);
      ptr_ = heap_.get();
    }
  }
  T* get() const { return ptr_; }

 private:
  alignas(64) T stack_[kStackScratchBytes / sizeof(T)];
  std::unique_ptr<T[]> heap_;
  T* ptr_ = nullptr;
};

// dst[i] = f(a[i], b[i]) for i in [0, n) (b may be null: f then gets zeros), f taking and returning
// vectors; non-temporal stores on the vector-aligned body when `stream`. a or b may be dst.
template <typename T, typename F>
static FASTNN_INLINE void row_map2(const T* a, const T* b, T* dst, int64_t n, bool stream, F f) {
  constexpr int64_t W = kLanes<T>;
  auto vec = [&](int64_t i) { return f(vload(a + i), b ? vload(b + i) : Vec<T>{}); };
  // k < W elements from i through one vector op (the other lanes compute f(0, 0), never stored): a row's
  // unaligned head and its tail cost one vector each, however expensive f is.
  auto part = [&](int64_t i, int64_t k) {
    if (k > 0) vstore_part(dst + i, f(vload_part(a + i, k, T(0)), b ? vload_part(b + i, k, T(0)) : Vec<T>{}), k);
  };
  int64_t i = 0;
  if (stream) {
    const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(dst) % sizeof(Vec<T>)) / int64_t(sizeof(T));
    i = std::min(n, mis ? W - mis : 0);
    part(0, i);
    for (; i + W <= n; i += W) vstore_stream(dst + i, vec(i));
  }
  for (; i + W <= n; i += W) vstore(dst + i, vec(i));
  part(i, n - i);
}

template <typename T, typename F> static FASTNN_INLINE void row_map(const T* src, T* dst, int64_t n, bool stream, F f) {
  row_map2(src, static_cast<const T*>(nullptr), dst, n, stream, [&](Vec<T> v, Vec<T>) { return f(v); });
}

// Rows are handed to threads in groups of at least this many elements.
constexpr int64_t kRowGrainElems = 1 << 15;

static int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrainElems / std::max<int64_t>(cols, 1)); }

template <typename T> static T row_max(const T* x, int64_t n) {
  constexpr int64_t W = kLanes<T>;
  int64_t i = 0;
  T m = -__builtin_inf();
  // vmax, hmax and smax may drop a NaN (they keep the first operand's only): deliberately, as the NaN is
  // carried by the sum instead (below), and a NaN-propagating max costs two more instructions per vector.
  if (n >= 2 * W) {
    Vec<T> m0 = vload(x), m1 = vload(x + W);
    for (i = 2 * W; i + 2 * W <= n; i += 2 * W) {
      m0 = vmax(m0, vload(x + i));
      m1 = vmax(m1, vload(x + i + W));
    }
    m = hmax(vmax(m0, m1));
  }
  for (; i < n; ++i) m = smax(m, x[i]);
  // A NaN anywhere makes the row NaN below (exp(x - max) is NaN there, and so is the row's sum), whichever
  // max this returns; +inf gives max = inf and exp(inf - inf) = NaN: NaN rows, as NumPy's formula gives.
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

// Whether to stream a rows x cols result past the cache: when it is large and its rows are long. (Rows
// of a few hundred bytes lose more to the cache lines they share with their neighbours, written partly
// by plain stores, than streaming saves: measured slower at 65536 x 128 float32.)
template <typename T> static bool stream_rows(int64_t rows, int64_t cols) {
  return rows * cols * int64_t(sizeof(T)) >= kStreamBytes && cols * int64_t(sizeof(T)) >= kStreamRowBytes;
}

// Rows [rb, re) of a rows x cols output `out`, produced by fill(r, dst), which writes row r to dst (cols
// elements) and returns the factor the row is still to be multiplied by. When streaming, fill writes a
// scratch row (in L1/L2) that is then streamed to `out` with the factor applied on the way; otherwise
// (or without scratch: very long rows, or no memory) fill writes `out` and the factor is applied in place.
template <typename T, typename Fill>
static void produce_rows(T* out, int64_t rb, int64_t re, int64_t cols, bool stream, Fill fill) {
  Scratch<T> scratch(stream ? cols : 0);
  T* buf = scratch.get();
  for (int64_t r = rb; r < re; ++r) {
    T* o = out + r * cols;
    const T f = fill(r, buf ? buf : o);
    if (buf)
      row_map(buf, o, cols, true, [sv = vset<T>(f)](Vec<T> v) { return v * sv; });
    else if (f != T(1))  // a NaN factor (a NaN row) is not 1: applied
      row_map(o, o, cols, false, [sv = vset<T>(f)](Vec<T> v) { return v * sv; });
  }
}

// Rows [rb, re) of softmax / log_softmax (y may be x).
template <typename T> static void softmax_rows(const T* x, T* y, int64_t rb, int64_t re, int64_t cols, bool log,
                                               bool stream) {
    if (log) {  // (x - m) - log(s), written straight from x; not x - (m + log(s)): for |m| large next to
                // log(s), m + log(s) rounds to m
      for (int64_t r = rb; r < re; ++r) {
        const T* xr = x + r * cols;
        const T m = row_max(xr, cols);
        const Vec<T> mv = vset<T>(m), lv = vset<T>(std::log(row_exp_sum<T>(xr, nullptr, cols, m)));
        row_map(xr, y + r * cols, cols, stream, [&](Vec<T> v) { return (v - mv) - lv; });
      }
      return;
    }
    produce_rows(y, rb, re, cols, stream, [&](int64_t r, T* dst) {
      const T* xr = x + r * cols;
      return T(1) / row_exp_sum(xr, dst, cols, row_max(xr, cols));
    });
}

template <typename T> void softmax(const T* x, T* y, int64_t rows, int64_t cols, bool log) {
  const bool stream = stream_rows<T>(rows, cols);
  parallel_for(rows, row_grain(cols), [&](int64_t rb, int64_t re) { softmax_rows(x, y, rb, re, cols, log, stream); });
  if (stream) stream_fence();
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

// Rows [rb, re) of the softmax / log_softmax backward (out may be g).
template <typename T> static void softmax_backward_rows(const T* g, const T* y, T* out, int64_t rb, int64_t re,
                                                        int64_t cols, bool log, bool stream) {
    for (int64_t r = rb; r < re; ++r) {
      const T* gr = g + r * cols;
      const T* yr = y + r * cols;
      if (log) {  // d log_softmax: g - exp(y) * sum(g); not streamed: measured slower so (0.9 -> 1.0-1.3 ms
                  // at 4096 x 1024 float32, one thread), unlike the other row ops
        const Vec<T> sv = vset<T>(row_sum(gr, cols));
        row_map2(gr, yr, out + r * cols, cols, false, [&](Vec<T> gv, Vec<T> yv) { return gv - vexp(yv) * sv; });
      } else {  // d softmax: y * (g - sum(g * y))
        const Vec<T> dv = vset<T>(row_dot(gr, yr, cols));
        row_map2(gr, yr, out + r * cols, cols, stream, [&](Vec<T> gv, Vec<T> yv) { return yv * (gv - dv); });
      }
    }
}

template <typename T> void softmax_backward(const T* g, const T* y, T* out, int64_t rows, int64_t cols, bool log) {
  const bool stream = !log && stream_rows<T>(rows, cols);
  parallel_for(rows, row_grain(cols), [&](int64_t rb, int64_t re) {
    softmax_backward_rows(g, y, out, rb, re, cols, log, stream);
  });
  if (stream) stream_fence();
}

// float16 / bfloat16: each thread widens a block of about kHalfBlockElems elements (whole rows) into its
// float32 workspace, runs the float32 row code there and rounds the results into the output, so
// the arrays are read and written at half width and every sum is a float32 one. Workspaces are allocated
// before the parallel call (bad_alloc reaches Python as MemoryError).
// Elements per float32 workspace block of the half kernels: 16 KiB, in L1 (the float32 row code makes
// three passes over it between the widening and the rounding): bfloat16 softmax at 4096 x 1024 took 1.9 ms
// on one thread against 2.45 ms with the float32 kernels' 32K-element (L2) blocks.
constexpr int64_t kHalfBlockElems = 4096;

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename F> static void half_row_blocks(int64_t rows, int64_t cols, int nbuf, F f) {
  const int64_t block = std::max<int64_t>(1, kHalfBlockElems / std::max<int64_t>(cols, 1));
  const int64_t blocks = (rows + block - 1) / block;
  const int64_t nt = std::min<int64_t>(num_threads(), blocks);
  // Buffers start on 64-byte boundaries: a vector load that splits a cache line costs (measured: 4096 x 1024
  // bfloat16 took 1.5x the float32 time from a 16-byte aligned workspace).
  const int64_t stride = round_up(block * cols, 16);
  std::unique_ptr<float[]> ws(new float[static_cast<size_t>(nt * nbuf * stride + 16)]);
  float* base = ws.get() + (16 - int64_t(reinterpret_cast<uintptr_t>(ws.get()) % 64) / 4) % 16;
  // f and the sizes are copied into this closure, not referenced in the callers' frames, whose cache lines
  // the calling thread writes while it works on its own pieces (bfloat16 softmax 4096 x 1024 on 2 threads
  // took 1.8 ms with [&] here and in softmax_half, 1.0-1.3 ms with [=]; 2.0 ms on one thread).
  parallel_ranges(blocks, nt, [=](int64_t b0, int64_t b1) {
    float* buf = base + thread_index() * nbuf * stride;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rb = b * block;
      f(rb, std::min(rows, rb + block), buf, stride);
    }
  });
}

void softmax_half(const uint16_t* x, uint16_t* y, int64_t rows, int64_t cols, bool log, bool bf16) {
  // [=]: the pointers are copied into the closure (see half_row_blocks).
  half_row_blocks(rows, cols, 1, [=](int64_t rb, int64_t re, float* buf, int64_t) {
    const int64_t n = (re - rb) * cols;
    widen_range(x + rb * cols, buf, 0, n, bf16);
    softmax_rows<float>(buf, buf, 0, re - rb, cols, log, false);
    narrow_range(buf, y + rb * cols, 0, n, bf16);
  });
}

void softmax_backward_half(const uint16_t* g, const uint16_t* y, uint16_t* out, int64_t rows, int64_t cols, bool log,
                           bool bf16) {
  half_row_blocks(rows, cols, 2, [=](int64_t rb, int64_t re, float* buf, int64_t stride) {
    const int64_t n = (re - rb) * cols;
    float* gb = buf;
    float* yb = buf + stride;
    widen_range(g + rb * cols, gb, 0, n, bf16);
    widen_range(y + rb * cols, yb, 0, n, bf16);
    softmax_backward_rows<float>(gb, yb, gb, 0, re - rb, cols, log, false);
    narrow_range(gb, out + rb * cols, 0, n, bf16);
  });
}

template <typename T>
double cross_entropy(const T* logits, const int64_t* labels, T* grad, T* row_loss, int64_t rows, int64_t cols,
                     T grad_scale, int64_t ignore_index) {
  const int64_t grain = row_grain(cols);
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads(), rows / grain));
  const bool stream = stream_rows<T>(rows, cols);
  std::vector<double> partial(static_cast<size_t>(nt) * 8, 0.0);  // 8 apart: no false sharing
  // Rows are split into nt fixed blocks so the sum does not depend on the schedule.
  parallel_for(nt, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      double loss = 0;
      produce_rows(grad, rows * t / nt, rows * (t + 1) / nt, cols, stream, [&](int64_t r, T* dst) {
        const int64_t label = labels[r];
        if (label == ignore_index) {  // torch's ignore_index: no loss, zero gradient
          if (row_loss) row_loss[r] = T(0);
          std::fill(dst, dst + cols, T(0));
          return T(1);
        }
        const T* xr = logits + r * cols;
        const T m = row_max(xr, cols);
        const T s = row_exp_sum(xr, dst, cols, m);
        // (m - x[label]) + log(s): m + log(s) first would lose log(s) next to a large m.
        const double l = (double(m) - double(xr[label])) + double(std::log(s));
        loss += l;
        if (row_loss) row_loss[r] = T(l);
        const T f = grad_scale / s;
        row_map(dst, dst, cols, false, [sv = vset<T>(f)](Vec<T> v) { return v * sv; });
        dst[label] -= grad_scale;
        return T(1);
      });
      partial[static_cast<size_t>(t) * 8] = loss;
    }
  });
  if (stream) stream_fence();
  double total = 0;
  for (int64_t t = 0; t < nt; ++t) total += partial[static_cast<size_t>(t) * 8];
  return total;
}

template void softmax<float>(const float*, float*, int64_t, int64_t, bool);
template void softmax<double>(const double*, double*, int64_t, int64_t, bool);
template void softmax_backward<float>(const float*, const float*, float*, int64_t, int64_t, bool);
template void softmax_backward<double>(const double*, const double*, double*, int64_t, int64_t, bool);
template double cross_entropy<float>(const float*, const int64_t*, float*, float*, int64_t, int64_t, float, int64_t);
template double cross_entropy<double>(const double*, const int64_t*, double*, double*, int64_t, int64_t, double,
                                      int64_t);

}  // namespace fastnn::cpu::FASTNN_ISA
