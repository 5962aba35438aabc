// pybind11 bindings of the CPU kernels (fastnn._C). The Python layer (fastnn/_ops.py) validates user
// arguments and prepares layouts; these entry points re-check what memory safety depends on (dtypes,
// contiguity, sizes, strides within bounds), release the GIL and call the kernel table in use.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "build_config.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using namespace fastnn::cpu;

namespace {

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

enum class DType { f32, f64 };

DType dtype_of(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::f32;
  if (a.dtype().is(py::dtype::of<double>())) return DType::f64;
  throw py::type_error(std::string(name) + ": expected float32 or float64, got " +
                       std::string(py::str(a.dtype())));
}

template <typename T> bool is_dtype(const py::array& a) { return a.dtype().is(py::dtype::of<T>()); }

// Elements aligned for their type (a view at an odd byte offset is not: misaligned loads are UB).
bool aligned(const py::array& a) { return a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_; }

// A C-contiguous array of T with `n` elements (writable when `write`).
template <typename T> T* contig(const py::array& a, const char* name, int64_t n, bool write = false) {
  if (!is_dtype<T>(a)) throw py::type_error(std::string(name) + ": dtype does not match the other operands");
  if (!(a.flags() & py::array::c_style)) value_error(std::string(name) + ": must be C-contiguous");
  if (!aligned(a)) value_error(std::string(name) + ": must be aligned");
  if (a.size() != n) value_error(std::string(name) + ": expected " + std::to_string(n) + " elements, got " +
                                 std::to_string(a.size()));
  if (write && !a.writeable()) value_error(std::string(name) + ": must be writable");
  return static_cast<T*>(const_cast<void*>(a.data()));
}

const int64_t* offsets(const py::array_t<int64_t, py::array::c_style>& o, int64_t n, const char* name) {
  if (o.size() != n) value_error(std::string(name) + ": expected " + std::to_string(n) + " batch offsets");
  return o.data();
}

// [lo, hi] byte range touched by an array view; used to check stride arguments against the real buffer.
void check_span(const py::array& a, const char* name, int64_t off_min, int64_t off_max, int64_t itemsize) {
  // Every element the kernel may touch must lie inside the array's own extent.
  if (!aligned(a)) value_error(std::string(name) + ": must be aligned");
  int64_t lo = 0, hi = 0;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) == 0) return;  // empty: nothing touched (callers skip empty work)
    const int64_t ext = (a.shape(d) - 1) * a.strides(d);
    (ext < 0 ? lo : hi) += ext;
  }
  if (off_min * itemsize < lo || off_max * itemsize > hi)
    value_error(std::string(name) + ": strides/offsets reach outside the array");
}

// check_span for a batch of r x c views: element (i, j) of view b at off[b] + i * rs + j * cs (strides of any
// sign). Nothing to check when a view is empty.
void check_batched_span(const py::array& arr, const char* name, const int64_t* off, int64_t batch, int64_t rs,
                        int64_t r, int64_t cs, int64_t c, int64_t itemsize) {
  if (batch == 0 || r == 0 || c == 0) return;
  int64_t omin = INT64_MAX, omax = INT64_MIN;
  for (int64_t i = 0; i < batch; ++i) omin = std::min(omin, off[i]), omax = std::max(omax, off[i]);
  const int64_t e1 = (r - 1) * rs, e2 = (c - 1) * cs;
  check_span(arr, name, omin + std::min<int64_t>(e1, 0) + std::min<int64_t>(e2, 0),
             omax + std::max<int64_t>(e1, 0) + std::max<int64_t>(e2, 0), itemsize);
}

template <typename T> const OpTable<T>& ops();
template <> const OpTable<float>& ops<float>() { return kernels().f32; }
template <> const OpTable<double>& ops<double>() { return kernels().f64; }

template <typename F> auto by_dtype(const py::array& a, const char* name, F&& f) {
  if (dtype_of(a, name) == DType::f32) return f(float{});
  return f(double{});
}

// ---- ops ---------------------------------------------------------------------------------------

void relu(const py::array& x, const py::array& out) {
  by_dtype(x, "x", [&](auto t) {
    using T = decltype(t);
    const int64_t n = x.size();
    const T* xp = contig<T>(x, "x", n);
    T* yp = contig<T>(out, "out", n, true);
    py::gil_scoped_release nogil;
    ops<T>().relu(xp, yp, n);
  });
}

// out = exp(x) through the current path's vector exp (for the tests of its accuracy; not public API).
void exp_vec(const py::array& x, const py::array& out) {
  by_dtype(x, "x", [&](auto t) {
    using T = decltype(t);
    const int64_t n = x.size();
    const T* xp = contig<T>(x, "x", n);
    T* yp = contig<T>(out, "out", n, true);
    py::gil_scoped_release nogil;
    ops<T>().exp(xp, yp, n);
  });
}

void relu_backward(const py::array& g, const py::array& x, const py::array& out) {
  by_dtype(x, "x", [&](auto t) {
    using T = decltype(t);
    const int64_t n = x.size();
    const T* gp = contig<T>(g, "grad_output", n);
    const T* xp = contig<T>(x, "x", n);
    T* op = contig<T>(out, "out", n, true);
    py::gil_scoped_release nogil;
    ops<T>().relu_backward(gp, xp, op, n);
  });
}

void softmax(const py::array& x, const py::array& out, int64_t cols, bool log) {
  by_dtype(x, "x", [&](auto t) {
    using T = decltype(t);
    const int64_t n = x.size();
    if (cols <= 0 || n % cols) value_error("softmax: bad row length");
    const T* xp = contig<T>(x, "x", n);
    T* yp = contig<T>(out, "out", n, true);
    py::gil_scoped_release nogil;
    ops<T>().softmax(xp, yp, n / cols, cols, log);
  });
}

void softmax_backward(const py::array& g, const py::array& y, const py::array& out, int64_t cols, bool log) {
  by_dtype(y, "output", [&](auto t) {
    using T = decltype(t);
    const int64_t n = y.size();
    if (cols <= 0 || n % cols) value_error("softmax_backward: bad row length");
    const T* gp = contig<T>(g, "grad_output", n);
    const T* yp = contig<T>(y, "output", n);
    T* op = contig<T>(out, "out", n, true);
    py::gil_scoped_release nogil;
    ops<T>().softmax_backward(gp, yp, op, n / cols, cols, log);
  });
}

// Label checks shared by cross_entropy and its fast path: each label in [0, cols) or == ignore_index.
// Returns the number of rows not ignored, or -1 at the first bad label.
int64_t count_labels(const int64_t* lab, int64_t rows, int64_t cols, int64_t ignore_index) {
  int64_t kept = 0;
  for (int64_t i = 0; i < rows; ++i) {
    if (lab[i] == ignore_index) continue;
    if (lab[i] < 0 || lab[i] >= cols) return -1;
    ++kept;
  }
  return kept;
}

// Summed loss over the rows not ignored; grad = (softmax - onehot) * grad_scale (zero for ignored rows);
// row_loss (None or a (rows,) array) receives each row's loss.
double cross_entropy(const py::array& logits, const py::array_t<int64_t, py::array::c_style>& labels,
                     const py::array& grad, int64_t cols, double grad_scale, int64_t ignore_index,
                     const py::object& row_loss) {
  return by_dtype(logits, "logits", [&](auto t) -> double {
    using T = decltype(t);
    const int64_t n = logits.size();
    if (cols <= 0 || n % cols) value_error("cross_entropy: bad row length");
    const int64_t rows = n / cols;
    const T* lp = contig<T>(logits, "logits", n);
    T* gp = contig<T>(grad, "grad", n, true);
    T* rp = row_loss.is_none() ? nullptr : contig<T>(row_loss.cast<py::array>(), "row_loss", rows, true);
    if (labels.size() != rows) value_error("labels: expected one label per row");
    const int64_t* lab = labels.data();
    if (count_labels(lab, rows, cols, ignore_index) < 0) value_error("labels: value out of range");
    py::gil_scoped_release nogil;
    return ops<T>().cross_entropy(lp, lab, gp, rp, rows, cols, T(grad_scale), ignore_index);
  });
}

using Offsets = py::array_t<int64_t, py::array::c_style>;

// Batched C[b] = A[b] @ B[b]: a, b are the original arrays; their element strides and per-batch element
// offsets come from the caller and are checked against the arrays' extents here.
void gemm(const py::array& a, const py::array& b, const py::array& out, const Offsets& a_off, const Offsets& b_off,
          int64_t M, int64_t N, int64_t K, int64_t a_rs, int64_t a_cs, int64_t b_rs, int64_t b_cs,
          const py::object& bias, bool relu, bool naive) {
  by_dtype(a, "a", [&](auto t) {
    using T = decltype(t);
    if (!is_dtype<T>(b)) throw py::type_error("b: dtype does not match a");
    const int64_t batch = a_off.size();
    if (M < 0 || N < 0 || K < 0) value_error("gemm: negative size");
    GemmArgs<T> g;
    g.M = M, g.N = N, g.K = K, g.batch = batch;
    g.A = static_cast<const T*>(a.data()), g.a_rs = a_rs, g.a_cs = a_cs;
    g.B = static_cast<const T*>(b.data()), g.b_rs = b_rs, g.b_cs = b_cs;
    g.a_off = offsets(a_off, batch, "a_off");
    g.b_off = offsets(b_off, batch, "b_off");
    g.C = contig<T>(out, "out", batch * M * N, true);
    g.ldc = N, g.c_bs = M * N;
    if (batch > 0 && M > 0 && N > 0 && K > 0) {
      check_batched_span(a, "a", g.a_off, batch, a_rs, M, a_cs, K, sizeof(T));
      check_batched_span(b, "b", g.b_off, batch, b_rs, K, b_cs, N, sizeof(T));
    }
    if (!bias.is_none()) g.bias = contig<T>(bias.cast<py::array>(), "bias", N);
    g.relu = relu;
    py::gil_scoped_release nogil;
    (naive ? ops<T>().gemm_naive : ops<T>().gemm)(g);
  });
}

// gemm with float16 / bfloat16 a and b (any 2-byte arrays: the Python layer passes uint16 views; bf16 says
// which format), widened while packing; out (and bias) float32, rounded by the caller.
void gemm_half(const py::array& a, const py::array& b, const py::array& out, const Offsets& a_off,
               const Offsets& b_off, int64_t M, int64_t N, int64_t K, int64_t a_rs, int64_t a_cs, int64_t b_rs,
               int64_t b_cs, const py::object& bias, bool relu, bool bf16) {
  if (a.itemsize() != 2 || b.itemsize() != 2) throw py::type_error("gemm_half: a and b must be 2-byte arrays");
  const int64_t batch = a_off.size();
  if (M < 0 || N < 0 || K < 0) value_error("gemm: negative size");
  GemmArgs<float> g;
  g.M = M, g.N = N, g.K = K, g.batch = batch;
  g.a_rs = a_rs, g.a_cs = a_cs, g.b_rs = b_rs, g.b_cs = b_cs;
  g.a_off = offsets(a_off, batch, "a_off");
  g.b_off = offsets(b_off, batch, "b_off");
  g.C = contig<float>(out, "out", batch * M * N, true);
  g.ldc = N, g.c_bs = M * N;
  if (batch > 0 && M > 0 && N > 0 && K > 0) {
    check_batched_span(a, "a", g.a_off, batch, a_rs, M, a_cs, K, 2);
    check_batched_span(b, "b", g.b_off, batch, b_rs, K, b_cs, N, 2);
  }
  if (!bias.is_none()) g.bias = contig<float>(bias.cast<py::array>(), "bias", N);
  g.relu = relu;
  const uint16_t* ap = static_cast<const uint16_t*>(a.data());
  const uint16_t* bp = static_cast<const uint16_t*>(b.data());
  py::gil_scoped_release nogil;
  kernels().half_gemm(g, ap, bp, bf16);
}

// Fast path for the most common call, a 2-D float product with no out=: shapes and strides are read here,
// the result allocated here. Returns None whenever anything is unusual (the Python layer then takes the
// general path, which also produces the error messages).
// Byte range [lo, hi) spanned by an array view.
std::pair<intptr_t, intptr_t> extent(const py::array& a) {
  intptr_t lo = reinterpret_cast<intptr_t>(a.data()), hi = lo;
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (a.shape(d) == 0) return {lo, lo};
    const intptr_t e = (a.shape(d) - 1) * a.strides(d);
    (e < 0 ? lo : hi) += e;
  }
  return {lo, hi + static_cast<intptr_t>(a.itemsize())};
}

bool overlap(const py::array& a, const py::array& b) {
  const auto x = extent(a), y = extent(b);
  return x.first < y.second && y.first < x.second;
}


// bfloat16 (bf16) / float16 bits <-> float32 between C-contiguous arrays of n elements: `half` is any 2-byte
// array (the Python layer passes a uint16 view of a bfloat16 or float16 one), `f` a float32 array.
void half_to_float(const py::array& half, const py::array& f, bool bf16) {
  const int64_t n = half.size();
  if (half.itemsize() != 2 || !(half.flags() & py::array::c_style) || !aligned(half))
    value_error("half: expected a C-contiguous, aligned 2-byte array");
  float* fp = contig<float>(f, "f", n, true);
  const uint16_t* hp = static_cast<const uint16_t*>(half.data());
  py::gil_scoped_release nogil;
  kernels().half_widen(hp, fp, n, bf16);
}

void float_to_half(const py::array& f, const py::array& half, bool bf16) {
  const int64_t n = half.size();
  if (half.itemsize() != 2 || !(half.flags() & py::array::c_style) || !aligned(half) || !half.writeable())
    value_error("half: expected a C-contiguous, aligned, writable 2-byte array");
  const float* fp = contig<float>(f, "f", n);
  uint16_t* hp = static_cast<uint16_t*>(const_cast<void*>(half.data()));
  py::gil_scoped_release nogil;
  kernels().half_narrow(fp, hp, n, bf16);
}

// Half-width ops on float16 / bfloat16 arrays, passed as uint16 views of their bits (bf16 says which
// format): C-contiguous, aligned, of the sizes given.
void half_relu(const py::array& x, const py::array& out, bool bf16) {
  const int64_t n = x.size();
  const uint16_t* xp = contig<uint16_t>(x, "x", n);
  uint16_t* yp = contig<uint16_t>(out, "out", n, true);
  py::gil_scoped_release nogil;
  kernels().half_relu(xp, yp, n, bf16);
}

void half_relu_backward(const py::array& g, const py::array& x, const py::array& out, bool bf16) {
  const int64_t n = x.size();
  const uint16_t* gp = contig<uint16_t>(g, "grad_output", n);
  const uint16_t* xp = contig<uint16_t>(x, "x", n);
  uint16_t* op = contig<uint16_t>(out, "out", n, true);
  py::gil_scoped_release nogil;
  kernels().half_relu_backward(gp, xp, op, n, bf16);
}

void half_softmax(const py::array& x, const py::array& out, int64_t cols, bool log, bool bf16) {
  const int64_t n = x.size();
  if (cols <= 0 || n % cols) value_error("softmax: bad row length");
  const uint16_t* xp = contig<uint16_t>(x, "x", n);
  uint16_t* yp = contig<uint16_t>(out, "out", n, true);
  py::gil_scoped_release nogil;
  kernels().half_softmax(xp, yp, n / cols, cols, log, bf16);
}

void half_softmax_backward(const py::array& g, const py::array& y, const py::array& out, int64_t cols, bool log,
                           bool bf16) {
  const int64_t n = y.size();
  if (cols <= 0 || n % cols) value_error("softmax_backward: bad row length");
  const uint16_t* gp = contig<uint16_t>(g, "grad_output", n);
  const uint16_t* yp = contig<uint16_t>(y, "output", n);
  uint16_t* op = contig<uint16_t>(out, "out", n, true);
  py::gil_scoped_release nogil;
  kernels().half_softmax_backward(gp, yp, op, n / cols, cols, log, bf16);
}

// Moments: all float32, or all 16-bit (uint16 views, like param).
void half_adam(const py::array& param, const py::array& grad, const py::array& exp_avg, const py::array& exp_avg_sq,
               const py::object& max_exp_avg_sq, double lr, double beta1, double beta2, double eps,
               double weight_decay, double step_size, double bias_correction2_sqrt, bool decoupled, bool maximize,
               bool bf16) {
  AdamHalfArgs a;
  AdamArgs<float>& h = a.h;
  h.n = param.size();
  a.param = contig<uint16_t>(param, "param", h.n, true);
  a.grad = contig<uint16_t>(grad, "grad", h.n);
  a.bf16 = bf16;
  a.half_states = !is_dtype<float>(exp_avg);
  if (a.half_states) {
    a.m16 = contig<uint16_t>(exp_avg, "exp_avg", h.n, true);
    a.v16 = contig<uint16_t>(exp_avg_sq, "exp_avg_sq", h.n, true);
    if (!max_exp_avg_sq.is_none())
      a.vmax16 = contig<uint16_t>(max_exp_avg_sq.cast<py::array>(), "max_exp_avg_sq", h.n, true);
  } else {
    h.exp_avg = contig<float>(exp_avg, "exp_avg", h.n, true);
    h.exp_avg_sq = contig<float>(exp_avg_sq, "exp_avg_sq", h.n, true);
    if (!max_exp_avg_sq.is_none())
      h.max_exp_avg_sq = contig<float>(max_exp_avg_sq.cast<py::array>(), "max_exp_avg_sq", h.n, true);
  }
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.eps = eps, h.weight_decay = weight_decay;
  h.step_size = step_size, h.bias_correction2_sqrt = bias_correction2_sqrt;
  h.decoupled = decoupled, h.maximize = maximize;
  py::gil_scoped_release nogil;
  kernels().half_adam(a);
}

// ---- fast paths for the common case, with the least per-call overhead ---------------------------
// Each takes the user's arguments as they are and returns None unless they are plain (numpy arrays of one
// float dtype, C-contiguous, aligned; out= None or directly writable); the Python layer then takes the
// general path, which also produces every error message.

template <typename T> bool plain(const py::array& a) {
  return is_dtype<T>(a) && (a.flags() & py::array::c_style) && aligned(a);
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

bool same_shape(const py::array& a, const std::vector<py::ssize_t>& shape) {
  if (a.ndim() != py::ssize_t(shape.size())) return false;
  for (py::ssize_t d = 0; d < a.ndim(); ++d)
    if (a.shape(d) != shape[d]) return false;
  return true;
}

// Whether every stride of `a` is a whole number of elements of T (else the general path copies it).
template <typename T> bool elem_strides(const py::array& a) {
  for (py::ssize_t d = 0; d < a.ndim(); ++d)
    if (a.strides(d) % py::ssize_t(sizeof(T))) return false;
  return true;
}

// The array of `shape` an op writes: a new one when out is None; `out` itself when it is a plain writable
// ndarray (not a subclass: a masked array is refused, np.matrix and np.memmap go through the general path)
// of that shape that either is exactly one of `in_place` (same data, both C-contiguous) or overlaps none of
// `inputs`; else None.
template <typename T>
py::object fast_out(const py::object& out, const std::vector<py::ssize_t>& shape,
                    std::initializer_list<const py::array*> inputs, std::initializer_list<const py::array*> in_place) {
  if (out.is_none()) return py::array_t<T>(shape);
  if (Py_TYPE(out.ptr()) != reinterpret_cast<PyTypeObject*>(py::detail::npy_api::get().PyArray_Type_))
    return py::none();
  auto o = py::reinterpret_borrow<py::array>(out);
  if (!plain<T>(o) || !o.writeable() || !same_shape(o, shape)) return py::none();
  for (const py::array* a : in_place)
    if (a->data() == o.data()) return out;
  for (const py::array* a : inputs)
    if (overlap(o, *a)) return py::none();
  return out;
}

template <typename T> T* data_of(const py::object& a) {
  return static_cast<T*>(py::reinterpret_borrow<py::array>(a).mutable_data());
}

template <typename F> py::object float_dispatch(const py::array& a, F&& f) {
  if (is_dtype<float>(a)) return f(float{});
  if (is_dtype<double>(a)) return f(double{});
  return py::none();
}

// C (M x N, contiguous) = A @ b (+ bias, relu) with A's element strides given and b's taken from the array
// (checked by elem_strides); the GIL is released while the kernel runs.
template <typename T>
void gemm_2d(const T* A, int64_t a_rs, int64_t a_cs, const py::array& b, T* C, int64_t M, int64_t N, int64_t K,
             const T* bias, bool relu) {
  GemmArgs<T> g;
  g.M = M, g.N = N, g.K = K;
  g.A = A, g.a_rs = a_rs, g.a_cs = a_cs;
  g.B = static_cast<const T*>(b.data()), g.b_rs = b.strides(0) / py::ssize_t(sizeof(T));
  g.b_cs = b.strides(1) / py::ssize_t(sizeof(T));
  g.C = C, g.ldc = N;
  g.bias = bias, g.relu = relu;
  py::gil_scoped_release nogil;
  ops<T>().gemm(g);
}

// matmul of two 2-D arrays of any element strides, into a new array or a directly writable out=.
py::object matmul2d(const py::array& a, const py::array& b, const py::object& out_obj) {
  if (a.ndim() != 2 || b.ndim() != 2 || !a.dtype().is(b.dtype()) || !aligned(a) || !aligned(b)) return py::none();
  const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
  if (b.shape(0) != K) return py::none();
  return float_dispatch(a, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!elem_strides<T>(a) || !elem_strides<T>(b)) return py::none();
    py::object c = fast_out<T>(out_obj, {M, N}, {&a, &b}, {});
    if (c.is_none()) return c;
    const py::ssize_t isz = sizeof(T);
    gemm_2d<T>(static_cast<const T*>(a.data()), a.strides(0) / isz, a.strides(1) / isz, b, data_of<T>(c), M, N, K,
               nullptr, false);
    return c;
  });
}

py::object relu_fast(const py::array& x, const py::object& out) {
  return float_dispatch(x, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!plain<T>(x)) return py::none();
    py::object y = fast_out<T>(out, shape_of(x), {&x}, {&x});
    if (y.is_none()) return y;
    const T* xp = static_cast<const T*>(x.data());
    T* yp = data_of<T>(y);
    const int64_t n = x.size();
    {
      py::gil_scoped_release nogil;
      ops<T>().relu(xp, yp, n);
    }
    return y;
  });
}

py::object relu_backward_fast(const py::array& g, const py::array& x, const py::object& out) {
  return float_dispatch(x, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!plain<T>(x) || !plain<T>(g) || !same_shape(g, shape_of(x))) return py::none();
    py::object y = fast_out<T>(out, shape_of(x), {&g, &x}, {&g, &x});
    if (y.is_none()) return y;
    const T* gp = static_cast<const T*>(g.data());
    const T* xp = static_cast<const T*>(x.data());
    T* yp = data_of<T>(y);
    const int64_t n = x.size();
    {
      py::gil_scoped_release nogil;
      ops<T>().relu_backward(gp, xp, yp, n);
    }
    return y;
  });
}

// softmax / log_softmax over the last axis (axis a Python int naming it) of a non-empty x.
py::object softmax_fast(const py::array& x, const py::object& axis, const py::object& out, bool log) {
  if (x.ndim() < 1 || x.size() == 0 || !PyLong_CheckExact(axis.ptr())) return py::none();
  const long ax = PyLong_AsLong(axis.ptr());
  if (ax == -1 && PyErr_Occurred()) {  // an int beyond long: the general path reports it
    PyErr_Clear();
    return py::none();
  }
  if (ax != -1 && ax != x.ndim() - 1) return py::none();
  return float_dispatch(x, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!plain<T>(x)) return py::none();
    py::object y = fast_out<T>(out, shape_of(x), {&x}, {&x});
    if (y.is_none()) return y;
    const T* xp = static_cast<const T*>(x.data());
    T* yp = data_of<T>(y);
    const int64_t cols = x.shape(x.ndim() - 1), rows = x.size() / cols;
    {
      py::gil_scoped_release nogil;
      ops<T>().softmax(xp, yp, rows, cols, log);
    }
    return y;
  });
}

// linear: x (..., in) plain, weight (in, out) of any element strides, bias None or plain (out,), activation
// None or "relu"; x with in == 0 takes the general path.
py::object linear_fast(const py::array& x, const py::array& w, const py::object& bias, const py::object& activation) {
  bool relu = false;
  if (!activation.is_none()) {
    // Compared as Python objects: no encoding of arbitrary user strings (a lone surrogate cannot be UTF-8).
    if (!PyUnicode_Check(activation.ptr()) || !activation.equal(py::str("relu"))) return py::none();
    relu = true;
  }
  if (x.ndim() < 1 || w.ndim() != 2 || !w.dtype().is(x.dtype()) || !aligned(w)) return py::none();
  const int64_t n_in = w.shape(0), n_out = w.shape(1);
  if (n_in == 0 || x.shape(x.ndim() - 1) != n_in) return py::none();
  return float_dispatch(x, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!plain<T>(x) || !elem_strides<T>(w)) return py::none();
    const T* bp = nullptr;
    if (!bias.is_none()) {
      if (!py::isinstance<py::array>(bias)) return py::none();
      auto b = py::reinterpret_borrow<py::array>(bias);
      if (!plain<T>(b) || b.ndim() != 1 || b.shape(0) != n_out) return py::none();
      bp = static_cast<const T*>(b.data());
    }
    std::vector<py::ssize_t> shape = shape_of(x);
    shape.back() = n_out;
    py::array_t<T> y(shape);
    gemm_2d<T>(static_cast<const T*>(x.data()), n_in, 1, w, y.mutable_data(), x.size() / n_in, n_out, n_in, bp, relu);
    return std::move(y);
  });
}

// cross_entropy: logits plain (N, C) with N, C > 0, labels a C-contiguous int64 (N,) array all in [0, C) or
// equal to ignore_index (a Python int), reduction the str "mean", "sum" or "none"; returns (loss, grad) as
// fastnn.cross_entropy does.
py::object cross_entropy_fast(const py::array& logits, const py::object& labels_obj, const py::object& reduction,
                              const py::object& ignore_obj) {
  if (logits.ndim() != 2 || logits.shape(0) == 0 || logits.shape(1) == 0 ||
      !py::isinstance<py::array_t<int64_t>>(labels_obj) || !PyLong_CheckExact(ignore_obj.ptr()) ||
      !PyUnicode_Check(reduction.ptr()))
    return py::none();
  int red;  // 0 mean, 1 sum, 2 none
  if (reduction.equal(py::str("mean"))) red = 0;
  else if (reduction.equal(py::str("sum"))) red = 1;
  else if (reduction.equal(py::str("none"))) red = 2;
  else return py::none();
  int overflow = 0;
  const long long ignore_index = PyLong_AsLongLongAndOverflow(ignore_obj.ptr(), &overflow);
  if (overflow || (ignore_index == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return py::none();
  }
  auto labels = py::reinterpret_borrow<py::array>(labels_obj);
  const int64_t rows = logits.shape(0), cols = logits.shape(1);
  if (!is_dtype<int64_t>(labels) || labels.ndim() != 1 || labels.shape(0) != rows ||
      !(labels.flags() & py::array::c_style) || !aligned(labels))
    return py::none();
  const int64_t* lab = static_cast<const int64_t*>(labels.data());
  const int64_t kept = count_labels(lab, rows, cols, ignore_index);
  if (kept < 0) return py::none();  // the general path names the bad label
  return float_dispatch(logits, [&](auto t) -> py::object {
    using T = decltype(t);
    if (!plain<T>(logits)) return py::none();
    py::array_t<T> grad({rows, cols});
    py::object row_loss = red == 2 ? py::object(py::array_t<T>(rows)) : py::object(py::none());
    const T* lp = static_cast<const T*>(logits.data());
    T* gp = grad.mutable_data();
    T* rp = red == 2 ? data_of<T>(row_loss) : nullptr;
    // mean: the loss and gradient are divided by the rows not ignored (none kept: NaN loss, zero gradient).
    const double scale = red == 0 ? 1.0 / double(kept) : 1.0;
    double total;
    {
      py::gil_scoped_release nogil;
      total = ops<T>().cross_entropy(lp, lab, gp, rp, rows, cols, T(scale), ignore_index);
    }
    if (red == 2) return py::make_tuple(row_loss, std::move(grad));
    return py::make_tuple(red == 0 ? total / double(kept) : total, std::move(grad));
  });
}

// Fills the forward arguments shared by sdpa and sdpa_backward, checking every stride/offset against
// the arrays' extents.
// Elem: the element type of q, k and v (T, or uint16_t: bfloat16 bits, for sdpa_bf16, whose a.Q/K/V stay null).
template <typename T, typename Elem = T>
void fill_sdpa(SdpaArgs<T>& a, const py::array& q, const py::array& k, const py::array& v, const Offsets& q_off,
               const Offsets& k_off, const Offsets& v_off, int64_t L, int64_t S, int64_t E, int64_t Ev, int64_t q_rs,
               int64_t k_rs, int64_t v_rs, const py::object& mask, const Offsets& m_off, int64_t m_rs, int64_t m_cs,
               bool causal, double scale) {
  if (!is_dtype<Elem>(k)) throw py::type_error("key: dtype does not match query");
  if (!is_dtype<Elem>(v)) throw py::type_error("value: dtype does not match query");
  if (L < 0 || S < 0 || E < 0 || Ev < 0) value_error("sdpa: negative size");
  const int64_t batch = q_off.size();
  a.batch = batch, a.L = L, a.S = S, a.E = E, a.Ev = Ev;
  if constexpr (std::is_same_v<Elem, T>) {
    a.Q = static_cast<const T*>(q.data()), a.K = static_cast<const T*>(k.data()), a.V = static_cast<const T*>(v.data());
  }
  a.q_off = offsets(q_off, batch, "q_off"), a.q_rs = q_rs;
  a.k_off = offsets(k_off, batch, "k_off"), a.k_rs = k_rs;
  a.v_off = offsets(v_off, batch, "v_off"), a.v_rs = v_rs;
  auto span = [&](const py::array& arr, const int64_t* off, int64_t rs, int64_t r, int64_t cs, int64_t c,
                  const char* name, int64_t itemsize) {
    if (batch == 0 || r == 0 || c == 0) return;
    if (rs < 0 || cs < 0) value_error(std::string(name) + ": negative strides must be resolved by the caller");
    check_batched_span(arr, name, off, batch, rs, r, cs, c, itemsize);
  };
  span(q, a.q_off, q_rs, L, 1, E, "query", sizeof(Elem));
  span(k, a.k_off, k_rs, S, 1, E, "key", sizeof(Elem));
  span(v, a.v_off, v_rs, S, 1, Ev, "value", sizeof(Elem));
  if (!mask.is_none()) {
    py::array m = mask.cast<py::array>();
    a.m_off = offsets(m_off, batch, "m_off"), a.m_rs = m_rs, a.m_cs = m_cs;
    if (m.dtype().is(py::dtype::of<bool>())) {
      a.bmask = static_cast<const uint8_t*>(m.data());
      span(m, a.m_off, m_rs, L, m_cs, S, "attn_mask", 1);
    } else if (is_dtype<T>(m)) {
      a.fmask = static_cast<const T*>(m.data());
      span(m, a.m_off, m_rs, L, m_cs, S, "attn_mask", sizeof(T));
    } else {
      throw py::type_error("attn_mask: expected bool or the query's dtype");
    }
  }
  a.causal = causal;
  a.scale = T(scale);
}

// dropout: None, or the tuple (drop_threshold, keep_scale, seed, offset) of fastnn/_dropout.py's Dropout.
template <typename T> void fill_dropout(SdpaArgs<T>& a, const py::object& dropout) {
  if (dropout.is_none()) return;
  auto d = dropout.cast<py::tuple>();
  if (d.size() != 4) value_error("dropout: expected (threshold, keep_scale, seed, offset)");
  a.dropout = true;
  a.drop_threshold = d[0].cast<uint32_t>();
  a.keep_scale = d[1].cast<double>();
  a.seed = d[2].cast<uint64_t>();
  a.offset = d[3].cast<uint32_t>();
}

// The forward's outputs: out (batch x L x Ev) and lse (batch x L, or None), both T; and the dropout.
template <typename T>
void fill_sdpa_out(SdpaArgs<T>& a, const py::array& out, const py::object& lse, const py::object& dropout) {
  a.O = contig<T>(out, "out", a.batch * a.L * a.Ev, true), a.o_bs = a.L * a.Ev;
  if (!lse.is_none()) a.lse = contig<T>(lse.cast<py::array>(), "lse", a.batch * a.L, true);
  fill_dropout(a, dropout);
}

// The backward's other operands: grad_output and output (Elem, as q, k and v: returned, since a bfloat16
// kernel takes them apart from a), lse and the gradients (T); and the dropout.
template <typename T, typename Elem = T>
std::pair<const Elem*, const Elem*> fill_sdpa_backward(SdpaBackwardArgs<T>& a, const py::array& d_out,
                                                       const py::array& out, const py::array& lse,
                                                       const py::array& dq, const py::array& dk,
                                                       const py::array& dv, const py::object& dropout) {
  const int64_t B = a.batch;
  const Elem* dop = contig<Elem>(d_out, "grad_output", B * a.L * a.Ev);
  const Elem* op = contig<Elem>(out, "output", B * a.L * a.Ev);
  a.lse_in = contig<T>(lse, "lse", B * a.L);
  a.dQ = contig<T>(dq, "grad_query", B * a.L * a.E, true);
  a.dK = contig<T>(dk, "grad_key", B * a.S * a.E, true);
  a.dV = contig<T>(dv, "grad_value", B * a.S * a.Ev, true);
  fill_dropout(a, dropout);
  return {dop, op};
}

void sdpa(const py::array& q, const py::array& k, const py::array& v, const py::array& out, const Offsets& q_off,
          const Offsets& k_off, const Offsets& v_off, int64_t L, int64_t S, int64_t E, int64_t Ev, int64_t q_rs,
          int64_t k_rs, int64_t v_rs, const py::object& mask, const Offsets& m_off, int64_t m_rs, int64_t m_cs,
          bool causal, double scale, const py::object& lse, const py::object& dropout) {
  by_dtype(q, "query", [&](auto t) {
    using T = decltype(t);
    SdpaArgs<T> a;
    fill_sdpa(a, q, k, v, q_off, k_off, v_off, L, S, E, Ev, q_rs, k_rs, v_rs, mask, m_off, m_rs, m_cs, causal, scale);
    fill_sdpa_out(a, out, lse, dropout);
    py::gil_scoped_release nogil;
    ops<T>().sdpa(a);
  });
}

// The attention forward on bfloat16 q, k, v (uint16 views of their bits) with the AVX512-BF16 dot product,
// into float32 out (and lse); mask bool or float32. Returns False when the path has no such kernel or an
// operand is outside its exact range: the caller then widens and calls sdpa (out is to be discarded).
bool sdpa_bf16(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
               const Offsets& q_off, const Offsets& k_off, const Offsets& v_off, int64_t L, int64_t S, int64_t E,
               int64_t Ev, int64_t q_rs, int64_t k_rs, int64_t v_rs, const py::object& mask, const Offsets& m_off,
               int64_t m_rs, int64_t m_cs, bool causal, double scale, const py::object& lse,
               const py::object& dropout) {
  const auto kernel = kernels().bf16_sdpa;
  if (!kernel) return false;
  if (!is_dtype<uint16_t>(q)) throw py::type_error("query: expected the uint16 bits of a bfloat16 array");
  SdpaArgs<float> a;
  fill_sdpa<float, uint16_t>(a, q, k, v, q_off, k_off, v_off, L, S, E, Ev, q_rs, k_rs, v_rs, mask, m_off, m_rs, m_cs,
                             causal, scale);
  fill_sdpa_out(a, out, lse, dropout);
  const auto* qp = static_cast<const uint16_t*>(q.data());
  const auto* kp = static_cast<const uint16_t*>(k.data());
  const auto* vp = static_cast<const uint16_t*>(v.data());
  py::gil_scoped_release nogil;
  return kernel(a, qp, kp, vp);
}

// The attention backward on bfloat16 q, k, v, d_out and out (uint16 views), float32 lse / dq / dk / dv:
// False when the path has no such kernel or the kernel gives up (the caller widens and calls sdpa_backward).
bool sdpa_backward_bf16(const py::array& q, const py::array& k, const py::array& v, const Offsets& q_off,
                        const Offsets& k_off, const Offsets& v_off, int64_t L, int64_t S, int64_t E, int64_t Ev,
                        int64_t q_rs, int64_t k_rs, int64_t v_rs, const py::object& mask, const Offsets& m_off,
                        int64_t m_rs, int64_t m_cs, bool causal, double scale, const py::array& d_out,
                        const py::array& out, const py::array& lse, const py::array& dq, const py::array& dk,
                        const py::array& dv, const py::object& dropout) {
  const auto kernel = kernels().bf16_sdpa_backward;
  if (!kernel) return false;
  if (!is_dtype<uint16_t>(q) || !is_dtype<uint16_t>(d_out) || !is_dtype<uint16_t>(out))
    throw py::type_error("query, grad_output, output: expected the uint16 bits of bfloat16 arrays");
  SdpaBackwardArgs<float> a;
  fill_sdpa<float, uint16_t>(a, q, k, v, q_off, k_off, v_off, L, S, E, Ev, q_rs, k_rs, v_rs, mask, m_off, m_rs, m_cs,
                             causal, scale);
  const auto [dop, op] = fill_sdpa_backward<float, uint16_t>(a, d_out, out, lse, dq, dk, dv, dropout);
  const auto* qp = static_cast<const uint16_t*>(q.data());
  const auto* kp = static_cast<const uint16_t*>(k.data());
  const auto* vp = static_cast<const uint16_t*>(v.data());
  py::gil_scoped_release nogil;
  return kernel(a, qp, kp, vp, dop, op);
}

void sdpa_backward(const py::array& q, const py::array& k, const py::array& v, const Offsets& q_off,
                   const Offsets& k_off, const Offsets& v_off, int64_t L, int64_t S, int64_t E, int64_t Ev,
                   int64_t q_rs, int64_t k_rs, int64_t v_rs, const py::object& mask, const Offsets& m_off,
                   int64_t m_rs, int64_t m_cs, bool causal, double scale, const py::array& d_out,
                   const py::array& out, const py::array& lse, const py::array& dq, const py::array& dk,
                   const py::array& dv, const py::object& dropout) {
  by_dtype(q, "query", [&](auto t) {
    using T = decltype(t);
    SdpaBackwardArgs<T> a;
    fill_sdpa(a, q, k, v, q_off, k_off, v_off, L, S, E, Ev, q_rs, k_rs, v_rs, mask, m_off, m_rs, m_cs, causal, scale);
    std::tie(a.dO, a.Of) = fill_sdpa_backward(a, d_out, out, lse, dq, dk, dv, dropout);
    py::gil_scoped_release nogil;
    ops<T>().sdpa_backward(a);
  });
}

void adam(const py::array& param, const py::array& grad, const py::array& exp_avg, const py::array& exp_avg_sq,
          const py::object& max_exp_avg_sq, double lr, double beta1, double beta2, double eps, double weight_decay,
          double step_size, double bias_correction2_sqrt, bool decoupled, bool maximize) {
  by_dtype(param, "param", [&](auto t) {
    using T = decltype(t);
    AdamArgs<T> a;
    a.n = param.size();
    a.param = contig<T>(param, "param", a.n, true);
    a.grad = contig<T>(grad, "grad", a.n);
    a.exp_avg = contig<T>(exp_avg, "exp_avg", a.n, true);
    a.exp_avg_sq = contig<T>(exp_avg_sq, "exp_avg_sq", a.n, true);
    if (!max_exp_avg_sq.is_none()) a.max_exp_avg_sq = contig<T>(max_exp_avg_sq.cast<py::array>(), "max_exp_avg_sq", a.n, true);
    a.lr = lr, a.beta1 = beta1, a.beta2 = beta2, a.eps = eps, a.weight_decay = weight_decay;
    a.step_size = step_size, a.bias_correction2_sqrt = bias_correction2_sqrt;
    a.decoupled = decoupled, a.maximize = maximize;
    py::gil_scoped_release nogil;
    ops<T>().adam(a);
  });
}

// One Adam step over lists of tensors (one dtype): param, grad, exp_avg, exp_avg_sq and, for AMSGrad,
// max_exp_avg_sq (None otherwise); step_sizes / bc2_sqrts per tensor (each tensor's own step). Each array
// is C-contiguous and the updated ones writable; one parallel region runs over all of them.
void adam_multi(const py::list& params, const py::list& grads, const py::list& exp_avgs,
                const py::list& exp_avg_sqs, const py::object& max_exp_avg_sqs, double lr, double beta1, double beta2,
                double eps, double weight_decay, const std::vector<double>& step_sizes,
                const std::vector<double>& bc2_sqrts, bool decoupled, bool maximize) {
  const size_t count = params.size();
  py::list vmax;
  if (!max_exp_avg_sqs.is_none()) vmax = max_exp_avg_sqs.cast<py::list>();
  if (grads.size() != count || exp_avgs.size() != count || exp_avg_sqs.size() != count ||
      step_sizes.size() != count || bc2_sqrts.size() != count || (!max_exp_avg_sqs.is_none() && vmax.size() != count))
    value_error("adam_multi: every list must have one entry per param");
  if (count == 0) return;
  auto arr = [](const py::list& l, size_t i) { return l[i].cast<py::array>(); };
  by_dtype(arr(params, 0), "params[0]", [&](auto t) {
    using T = decltype(t);
    std::vector<AdamArgs<T>> args(count);
    std::vector<py::array> keep;  // holds the arrays (and their buffers) until the kernel returns
    keep.reserve(count * 5);
    for (size_t i = 0; i < count; ++i) {
      AdamArgs<T>& a = args[i];
      keep.push_back(arr(params, i));
      a.n = keep.back().size();
      a.param = contig<T>(keep.back(), "param", a.n, true);
      keep.push_back(arr(grads, i));
      a.grad = contig<T>(keep.back(), "grad", a.n);
      keep.push_back(arr(exp_avgs, i));
      a.exp_avg = contig<T>(keep.back(), "exp_avg", a.n, true);
      keep.push_back(arr(exp_avg_sqs, i));
      a.exp_avg_sq = contig<T>(keep.back(), "exp_avg_sq", a.n, true);
      if (!max_exp_avg_sqs.is_none()) {
        keep.push_back(arr(vmax, i));
        a.max_exp_avg_sq = contig<T>(keep.back(), "max_exp_avg_sq", a.n, true);
      }
      a.lr = lr, a.beta1 = beta1, a.beta2 = beta2, a.eps = eps, a.weight_decay = weight_decay;
      a.step_size = step_sizes[i], a.bias_correction2_sqrt = bc2_sqrts[i];
      a.decoupled = decoupled, a.maximize = maximize;
    }
    py::gil_scoped_release nogil;
    ops<T>().adam_multi(args.data(), int64_t(count));
  });
}

// Measures the machine's limits with the ISA path in use: FMA peak (float32/float64) and the memory
// bandwidth of the copy, in-place and Adam access patterns on ~256 MiB (far beyond the caches).
py::dict machine_limits(int threads, bool quick) {
  if (threads < 1) value_error("threads: expected >= 1");
  const KernelTable& k = kernels();
  const int64_t bytes = int64_t(quick ? 128 : 256) << 20;
  const int reps = quick ? 2 : 4;
  double pf, pd, pb, copy, rw, adam;
  {
    py::gil_scoped_release nogil;
    pf = k.probe_peak_gflops(threads, kPeakF32);
    pd = k.probe_peak_gflops(threads, kPeakF64);
    pb = k.probe_peak_gflops(threads, kPeakBf16Dot);
    copy = k.probe_bandwidth_gbs(0, threads, bytes, reps);
    rw = k.probe_bandwidth_gbs(1, threads, bytes, reps);
    adam = k.probe_bandwidth_gbs(2, threads, bytes, reps);
  }
  py::dict d;
  d["peak_gflops_f32"] = pf;
  d["peak_gflops_f64"] = pd;
  // bfloat16 products: the dot product's peak where the path has one, else they run at float32's.
  d["peak_gflops_bf16"] = pb > 0 ? pb : pf;
  d["mem_copy_gbs"] = copy;
  d["mem_rw_gbs"] = rw;
  d["mem_adam_gbs"] = adam;
  d["threads"] = threads;
  py::dict src;
  const std::string isa = k.isa;
  src["peak_gflops_f32"] = "native FMA probe (" + isa + ")";
  src["peak_gflops_f64"] = "native FMA probe (" + isa + ")";
  src["peak_gflops_bf16"] = pb > 0 ? "native bf16 dot-product probe (" + isa + ")"
                                   : "the float32 FMA peak (" + isa + " widens bfloat16 to float32)";
  src["mem_copy_gbs"] = "native copy probe, " + std::to_string(bytes >> 20) + " MiB";
  src["mem_rw_gbs"] = "native in-place probe, " + std::to_string(bytes >> 20) + " MiB";
  src["mem_adam_gbs"] = "native 4-read/3-write probe, " + std::to_string(bytes >> 20) + " MiB";
  d["source"] = src;
  return d;
}

py::dict build_info() {
  py::dict d;
  d["version"] = FASTNN_VERSION;
  d["compiler"] = FASTNN_COMPILER;
  d["build_type"] = FASTNN_BUILD_TYPE;
  d["cxx_flags"] = FASTNN_CXX_FLAGS;
  d["cpu_isa_compiled"] = FASTNN_ISA_LIST;
  py::dict isa_flags;
  isa_flags["generic"] = "";
  isa_flags["avx2"] = FASTNN_ISA_FLAGS_AVX2;
  isa_flags["avx512"] = FASTNN_ISA_FLAGS_AVX512;
#ifdef FASTNN_HAVE_avx512bf16
  isa_flags["avx512bf16"] = FASTNN_ISA_FLAGS_AVX512BF16;
#endif
  d["cpu_isa_flags"] = isa_flags;
  d["thread_pool"] = thread_pool_info();
  d["cuda_built"] = bool(FASTNN_CUDA_BUILT);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnn CPU kernels (private: use the fastnn package)";
  m.attr("__version__") = FASTNN_VERSION;
  m.def("relu", &relu);
  m.def("relu_backward", &relu_backward);
  m.def("_exp", &exp_vec);
  m.def("softmax", &softmax);
  m.def("softmax_backward", &softmax_backward);
  m.def("cross_entropy", &cross_entropy);
  m.def("gemm", &gemm);
  m.def("matmul2d", &matmul2d);
  m.def("relu_fast", &relu_fast);
  m.def("relu_backward_fast", &relu_backward_fast);
  m.def("softmax_fast", &softmax_fast);
  m.def("linear_fast", &linear_fast);
  m.def("cross_entropy_fast", &cross_entropy_fast);
  m.def("sdpa", &sdpa, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("q_off"), py::arg("k_off"),
        py::arg("v_off"), py::arg("L"), py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("q_rs"), py::arg("k_rs"),
        py::arg("v_rs"), py::arg("mask"), py::arg("m_off"), py::arg("m_rs"), py::arg("m_cs"), py::arg("causal"),
        py::arg("scale"), py::arg("lse"), py::arg("dropout") = py::none());
  m.def("sdpa_bf16", &sdpa_bf16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("q_off"),
        py::arg("k_off"), py::arg("v_off"), py::arg("L"), py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("q_rs"),
        py::arg("k_rs"), py::arg("v_rs"), py::arg("mask"), py::arg("m_off"), py::arg("m_rs"), py::arg("m_cs"),
        py::arg("causal"), py::arg("scale"), py::arg("lse"), py::arg("dropout") = py::none());
  m.def("sdpa_backward_bf16", &sdpa_backward_bf16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_off"),
        py::arg("k_off"), py::arg("v_off"), py::arg("L"), py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("q_rs"),
        py::arg("k_rs"), py::arg("v_rs"), py::arg("mask"), py::arg("m_off"), py::arg("m_rs"), py::arg("m_cs"),
        py::arg("causal"), py::arg("scale"), py::arg("d_out"), py::arg("out"), py::arg("lse"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("dropout") = py::none());
  m.def("sdpa_backward", &sdpa_backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_off"), py::arg("k_off"),
        py::arg("v_off"), py::arg("L"), py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("q_rs"), py::arg("k_rs"),
        py::arg("v_rs"), py::arg("mask"), py::arg("m_off"), py::arg("m_rs"), py::arg("m_cs"), py::arg("causal"),
        py::arg("scale"), py::arg("d_out"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("dropout") = py::none());
  m.def("adam", &adam);
  m.def("half_to_float", &half_to_float);
  m.def("half_relu", &half_relu);
  m.def("half_relu_backward", &half_relu_backward);
  m.def("half_softmax", &half_softmax);
  m.def("half_softmax_backward", &half_softmax_backward);
  m.def("half_adam", &half_adam);
  m.def("gemm_half", &gemm_half);
  m.def("float_to_half", &float_to_half);
  m.def("adam_multi", &adam_multi);
  m.def("build_info", &build_info);
  m.def("machine_limits", &machine_limits, py::arg("threads"), py::arg("quick") = false);
  m.def("set_isa", [](const std::string& name) { return set_isa(name.c_str()); });
  m.def("isa", []() { return std::string(isa_in_use()); });
  m.def("bf16_attention", []() { return kernels().bf16_sdpa != nullptr; });
  m.def("isa_supported", []() { return std::string(isa_supported()); });
  m.def("set_num_threads", [](int n) { set_num_threads(n); });
  m.def("get_num_threads", []() { return num_threads(); });
}
