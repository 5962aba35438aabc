// Fills this ISA unit's kernel table (compiled once per ISA, like every kernel source).
#include "cpu/kernels.h"
#include "cpu/ops.h"

namespace fastnn::cpu::FASTNN_ISA {

template <typename T> static OpTable<T> make_table() {
  OpTable<T> t;
  t.relu = relu<T>;
  t.relu_backward = relu_backward<T>;
  t.exp = exp_array<T>;
  t.softmax = softmax<T>;
  t.softmax_backward = softmax_backward<T>;
  t.cross_entropy = cross_entropy<T>;
  t.gemm = gemm<T>;
  t.gemm_naive = gemm_naive<T>;
  t.sdpa = sdpa<T>;
  t.sdpa_backward = sdpa_backward<T>;
  t.adam = adam<T>;
  t.adam_multi = adam_multi<T>;
  return t;
}

#define FASTNN_STR2(x) #x
#define FASTNN_STR(x) FASTNN_STR2(x)

const KernelTable& kernel_table() {
  static const KernelTable table{FASTNN_STR(FASTNN_ISA), make_table<float>(), make_table<double>(),
                                 half_widen, half_narrow, half_relu, half_relu_backward, softmax_half,
                                 softmax_backward_half, adam_half, gemm_half, nullptr, nullptr,
                                 probe_peak_gflops, probe_bandwidth_gbs};
  return table;
}

}  // namespace fastnn::cpu::FASTNN_ISA
