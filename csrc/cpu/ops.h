// Declarations of the kernel templates of one ISA unit (explicitly instantiated for float and double
// in each op's source file).
#pragma once
#include "cpu/kernels.h"

namespace fastnn::cpu::FASTNN_ISA {

template <typename T> void relu(const T* x, T* y, int64_t n);
template <typename T> void relu_backward(const T* g, const T* x, T* out, int64_t n);
template <typename T> void exp_array(const T* x, T* y, int64_t n);
template <typename T> void softmax(const T* x, T* y, int64_t rows, int64_t cols, bool log);
template <typename T> void softmax_backward(const T* g, const T* y, T* out, int64_t rows, int64_t cols, bool log);
template <typename T>
double cross_entropy(const T* logits, const int64_t* labels, T* grad, T* row_loss, int64_t rows, int64_t cols,
                     T grad_scale, int64_t ignore_index);
template <typename T> void gemm(const GemmArgs<T>& args);
template <typename T> void sdpa(const SdpaArgs<T>& args);
template <typename T> void sdpa_backward(const SdpaBackwardArgs<T>& args);
template <typename T> void adam(const AdamArgs<T>& args);
template <typename T> void adam_multi(const AdamArgs<T>* args, int64_t count);

// bfloat16 (bf16) or float16 bits <-> float32, rounding to nearest even (half.cpp).
void half_widen(const uint16_t* src, float* dst, int64_t n, bool bf16);
void half_narrow(const float* src, uint16_t* dst, int64_t n, bool bf16);
void half_relu(const uint16_t* x, uint16_t* y, int64_t n, bool bf16);
void half_relu_backward(const uint16_t* g, const uint16_t* x, uint16_t* out, int64_t n, bool bf16);
void softmax_half(const uint16_t* x, uint16_t* y, int64_t rows, int64_t cols, bool log, bool bf16);
void softmax_backward_half(const uint16_t* g, const uint16_t* y, uint16_t* out, int64_t rows, int64_t cols, bool log,
                           bool bf16);
void adam_half(const AdamHalfArgs& args);
void gemm_half(const GemmArgs<float>& args, const uint16_t* A, const uint16_t* B, bool bf16);

double probe_peak_gflops(int threads, int kind);
double probe_bandwidth_gbs(int pattern, int threads, int64_t bytes, int reps);

// The plainest correct GEMM (triple loop), kept beside the packed one: tests compare both.
template <typename T> void gemm_naive(const GemmArgs<T>& args);

}  // namespace fastnn::cpu::FASTNN_ISA
