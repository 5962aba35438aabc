// The CPU kernel interface: argument structs and the per-ISA table of kernel entry points.
// Kernels assume validated arguments (the bindings check everything) and contain no checks.
#pragma once
#include <cstdint>

namespace fastnn::cpu {

// C[b] = A[b] @ B[b] (+ bias, then relu) for b in [0, batch).
// A is M x K with element strides (a_rs, a_cs), B is K x N with (b_rs, b_cs): any sign, any layout.
// C rows are contiguous with row stride ldc; batch b uses A + a_off[b], B + b_off[b], C + b * c_bs.
template <typename T> struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr; int64_t a_rs = 0, a_cs = 0;
  const T* B = nullptr; int64_t b_rs = 0, b_cs = 0;
  T* C = nullptr; int64_t ldc = 0;
  int64_t batch = 1;
  const int64_t* a_off = nullptr;  // null: all zero
  const int64_t* b_off = nullptr;
  int64_t c_bs = 0;
  const T* bias = nullptr;         // length N, or null
  bool relu = false;
};

// Scaled dot-product attention over `batch` independent heads.
// Q: L x E rows (row stride q_rs, contiguous within a row), K: S x E (k_rs), V: S x Ev (v_rs),
// O: L x Ev contiguous per head (o_bs apart). Per head b: Q + q_off[b], K + k_off[b], V + v_off[b].
// Mask (optional): element (i, j) at mask + m_off[b] + i * m_rs + j * m_cs (strides may be 0: broadcast);
// a float mask is added to the scores, a bool mask (uint8: nonzero = may attend) selects them.
// causal: key j is allowed for query i iff j <= i. A query row with no allowed key gets zeros.
// lse (optional): per (head, query) log-sum-exp of the scaled, masked scores (-inf for an empty row).
template <typename T> struct SdpaArgs {
  int64_t batch = 0, L = 0, S = 0, E = 0, Ev = 0;
  const T* Q = nullptr; const int64_t* q_off = nullptr; int64_t q_rs = 0;
  const T* K = nullptr; const int64_t* k_off = nullptr; int64_t k_rs = 0;
  const T* V = nullptr; const int64_t* v_off = nullptr; int64_t v_rs = 0;
  T* O = nullptr; int64_t o_bs = 0;
  const T* fmask = nullptr;
  const uint8_t* bmask = nullptr;
  const int64_t* m_off = nullptr; int64_t m_rs = 0, m_cs = 0;
  bool causal = false;
  T scale = 1;
  T* lse = nullptr;  // batch x L, or null
  // Dropout on the probabilities (fastnn/_dropout.py defines the mask): probability (b, i, j) is dropped
  // when word j % 4 of Philox4x32-10(counter (j / 4, i, b, offset), key (seed low, seed high) 32 bits) is
  // below drop_threshold; the survivors are multiplied by keep_scale = 1 / (1 - p).
  bool dropout = false;
  uint32_t drop_threshold = 0, offset = 0;
  uint64_t seed = 0;
  double keep_scale = 1;
};

// Attention backward, flash-style (scores recomputed tile by tile from lse). Inputs as in SdpaArgs plus
// dO and O (batch x L x Ev, contiguous) and lse (batch x L); outputs per head, contiguous:
// dQ (batch x L x E), dK (batch x S x E), dV (batch x S x Ev). Heads sharing key/value (GQA, broadcast)
// get separate dK/dV here; the caller sums them.
template <typename T> struct SdpaBackwardArgs : SdpaArgs<T> {
  const T* dO = nullptr;
  const T* Of = nullptr;
  const T* lse_in = nullptr;
  T* dQ = nullptr;
  T* dK = nullptr;
  T* dV = nullptr;
};

// One fused torch.optim.Adam step over n contiguous elements, in place.
template <typename T> struct AdamArgs {
  int64_t n = 0;
  T* param = nullptr; const T* grad = nullptr; T* exp_avg = nullptr; T* exp_avg_sq = nullptr;
  T* max_exp_avg_sq = nullptr;  // AMSGrad when non-null
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  double step_size = 0;                // lr / (1 - beta1^step)
  double bias_correction2_sqrt = 1;    // sqrt(1 - beta2^step)
  bool decoupled = false, maximize = false;
};

// Adam on float16 / bfloat16 (bf16) parameters and gradients: `h` holds the hyper-parameters and, when the
// moments are float32, their arrays; otherwise they are the 16-bit m16 / v16 / vmax16 (vmax: AMSGrad).
struct AdamHalfArgs {
  AdamArgs<float> h;
  uint16_t* param = nullptr;
  const uint16_t* grad = nullptr;
  uint16_t *m16 = nullptr, *v16 = nullptr, *vmax16 = nullptr;
  bool half_states = false, bf16 = false;
};

enum PeakKind { kPeakF32 = 0, kPeakF64 = 1, kPeakBf16Dot = 2 };

template <typename T> struct OpTable {
  void (*relu)(const T* x, T* y, int64_t n);
  void (*relu_backward)(const T* g, const T* x, T* out, int64_t n);
  // y = exp(x) through the vector exp the other kernels use (tests of its accuracy).
  void (*exp)(const T* x, T* y, int64_t n);
  // Row-wise over `rows` contiguous rows of length `cols`.
  void (*softmax)(const T* x, T* y, int64_t rows, int64_t cols, bool log);
  // grad_in = y * (g - sum(g * y)) (softmax) or g - exp(y) * sum(g) (log_softmax, y = log-probs).
  void (*softmax_backward)(const T* g, const T* y, T* out, int64_t rows, int64_t cols, bool log);
  // Returns the summed loss of the rows whose label is not ignore_index; writes grad = (softmax - onehot)
  // * grad_scale and, when row_loss is not null, each row's loss (ignored rows: zero loss and gradient).
  // labels are validated (in [0, cols) or ignore_index).
  double (*cross_entropy)(const T* logits, const int64_t* labels, T* grad, T* row_loss, int64_t rows, int64_t cols,
                          T grad_scale, int64_t ignore_index);
  void (*gemm)(const GemmArgs<T>& args);
  void (*gemm_naive)(const GemmArgs<T>& args);  // the plain triple loop, for tests
  void (*sdpa)(const SdpaArgs<T>& args);
  void (*sdpa_backward)(const SdpaBackwardArgs<T>& args);
  void (*adam)(const AdamArgs<T>& args);
  // One step over `count` tensors (torch's multi-tensor fused Adam): threads take chunks of all of them.
  void (*adam_multi)(const AdamArgs<T>* args, int64_t count);
};

struct KernelTable {
  const char* isa;
  OpTable<float> f32;
  OpTable<double> f64;
  // bfloat16 (bf16 = true) or float16 bits <-> float32 over n contiguous elements, threaded; narrowing rounds
  // to nearest even and keeps NaN NaN. The half-precision ops run the float32 kernels between the two.
  void (*half_widen)(const uint16_t* src, float* dst, int64_t n, bool bf16);
  void (*half_narrow)(const float* src, uint16_t* dst, int64_t n, bool bf16);
  // Ops on 16-bit arrays read and written at half width, computed in float32 (OpTable's meanings).
  void (*half_relu)(const uint16_t* x, uint16_t* y, int64_t n, bool bf16);
  void (*half_relu_backward)(const uint16_t* g, const uint16_t* x, uint16_t* out, int64_t n, bool bf16);
  void (*half_softmax)(const uint16_t* x, uint16_t* y, int64_t rows, int64_t cols, bool log, bool bf16);
  void (*half_softmax_backward)(const uint16_t* g, const uint16_t* y, uint16_t* out, int64_t rows, int64_t cols,
                                bool log, bool bf16);
  void (*half_adam)(const AdamHalfArgs& args);
  // C = A @ B (+ bias, relu) as GemmArgs<float> says, but A and B (args.A / args.B unused) are 16-bit arrays
  // with args' strides and offsets, widened to float32 while the panels are packed; C and bias are float32.
  void (*half_gemm)(const GemmArgs<float>& args, const uint16_t* A, const uint16_t* B, bool bf16);
  // Attention forward on bfloat16 Q, K, V (args' Q, K, V unused; its mask, when float, is float32): true when
  // done, false (the output to be discarded) when an operand is outside the dot product's exact range.
  // Null on paths without the AVX512-BF16 dot product (the caller widens to float32 and calls sdpa).
  bool (*bf16_sdpa)(const SdpaArgs<float>& args, const uint16_t* Q, const uint16_t* K, const uint16_t* V);
  // Its backward: bfloat16 Q, K, V, dO and O (args' dO and Of unused), float32 lse, float32 dQ, dK, dV; false
  // when an operand is outside the range or a row's dO . O is not finite (the caller widens and retries).
  bool (*bf16_sdpa_backward)(const SdpaBackwardArgs<float>& args, const uint16_t* Q, const uint16_t* K,
                             const uint16_t* V, const uint16_t* dO, const uint16_t* O);
  // Machine-limit probes (probe.cpp), for the benchmark. The peak of kind kPeakF32 / kPeakF64 (vector FMA)
  // or kPeakBf16Dot (the AVX512-BF16 pair dot product: 0 on paths without it).
  double (*probe_peak_gflops)(int threads, int kind);
  double (*probe_bandwidth_gbs)(int pattern, int threads, int64_t bytes, int reps);
};

// Defined once per compiled ISA unit (registry.cpp).
namespace generic { const KernelTable& kernel_table(); }
namespace avx2 { const KernelTable& kernel_table(); }
namespace avx512 { const KernelTable& kernel_table(); }
namespace avx512bf16 { const KernelTable& kernel_table(); }  // avx512's, bf16 matmul and attention on AVX512-BF16

// dispatch.cpp: the table in use, chosen at import (FASTNN_CPU_ISA may force a lower path).
const KernelTable& kernels();
// Selects an ISA by name; returns false (and changes nothing) when it is not compiled or not supported.
bool set_isa(const char* name);
const char* isa_in_use();
// Comma-separated ISA paths compiled in and supported by this CPU, best last.
const char* isa_supported();

// threads.cpp: the thread count used by the kernels (all Python threads share it), and a one-line
// description of the pool (fastnn.info()["thread_pool"]).
int num_threads();
void set_num_threads(int n);
const char* thread_pool_info();

}  // namespace fastnn::cpu
