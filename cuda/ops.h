// Entry points of the CUDA ops, called by the bindings (module.cpp). Plain C++ types only, so the pybind11
// translation unit is compiled by the host compiler and never sees CUDA headers.
//
// Conventions: pointers are device addresses (uintptr_t), `stream` a cudaStream_t as an integer (cupy's
// current stream), `device` the CUDA device that owns the arrays, `dtype` 0 = float32, 1 = float16.
// `variant` 0 runs the plainest kernel (a reference for tests), 1 the fast one. Arguments were validated by
// fastnn/_gpu.py; every CUDA failure throws std::runtime_error naming the op. Nothing synchronizes.
#pragma once

#include <cstdint>
#include <string>

namespace fastnn::cuda {

// y[i] = max(x[i], 0) (NaN kept); x and y contiguous, n elements (y may be x).
void relu(int device, int dtype, uintptr_t x, uintptr_t y, int64_t n, uintptr_t stream, int variant);
// dx[i] = x[i] > 0 ? g[i] : 0.
void relu_backward(int device, int dtype, uintptr_t g, uintptr_t x, uintptr_t dx, int64_t n, uintptr_t stream,
                   int variant);

// Row-wise over contiguous (rows, cols): softmax or log_softmax (log = true); y may be x.
void softmax(int device, int dtype, uintptr_t x, uintptr_t y, int64_t rows, int64_t cols, bool log,
             uintptr_t stream, int variant);
// softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g).
void softmax_backward(int device, int dtype, uintptr_t g, uintptr_t y, uintptr_t dx, int64_t rows, int64_t cols,
                      bool log, uintptr_t stream, int variant);
// Per row r of logits (rows, cols): row_loss[r] (float32) = logsumexp(x_r) - x_r[label_r];
// grad = (softmax(x_r) - onehot(label_r)) * grad_scale; a row labelled ignore_index gets zero loss and
// gradient. labels: int64, already checked to lie in [0, cols) or equal ignore_index.
void cross_entropy(int device, int dtype, uintptr_t logits, uintptr_t labels, uintptr_t grad, uintptr_t row_loss,
                   int64_t rows, int64_t cols, float grad_scale, int64_t ignore_index, uintptr_t stream, int variant);

// c[z] (M, N contiguous, z < batch) = a[z] @ b[z] (+ bias[n]) (relu), float accumulation.
// a[z][m][k] = a[a_off[z] + m * a_rs + k * a_cs], b likewise; a_off/b_off are device int64 arrays of
// `batch` element offsets. bias: 0 or a contiguous (N,) array.
void gemm(int device, int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t a_off, uintptr_t b_off,
          int64_t batch, int64_t M, int64_t N, int64_t K, int64_t a_rs, int64_t a_cs, int64_t b_rs, int64_t b_cs,
          uintptr_t bias, bool relu, uintptr_t stream, int variant);

// out[z] (L, Ev contiguous) = softmax(q[z] k[z]^T * scale + mask) v[z] for z < nbatch. q/k/v rows at
// ptr + off[z] + row * rs with unit column stride (device int64 offset arrays). mask_kind: 0 none,
// 1 bool (uint8, nonzero = may attend), 2 additive (dtype of q); element mask[m_off[z] + i*m_rs + j*m_cs].
// causal: key j allowed for query i iff j <= i. A query row with no allowed key gives zeros and lse -inf.
// lse: 0 or (nbatch, L) contiguous float32 for every dtype. dropout: probability (z, i, j) dropped when word j % 4 of
// Philox4x32-10(counter (j / 4, i, z, offset), key (seed low, seed high)) < drop_threshold; survivors times
// keep_scale (fastnn/_dropout.py).
void sdpa(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t q_off,
          uintptr_t k_off, uintptr_t v_off, int64_t nbatch, int64_t L, int64_t S, int64_t E, int64_t Ev,
          int64_t q_rs, int64_t k_rs, int64_t v_rs, uintptr_t mask, int mask_kind, uintptr_t m_off, int64_t m_rs,
          int64_t m_cs, bool causal, float scale, uintptr_t lse, uintptr_t stream, int variant, bool dropout,
          uint32_t drop_threshold, float keep_scale, uint64_t seed, uint32_t offset);

// One in-place Adam step on n contiguous elements with torch.optim.Adam's arithmetic. param and grad in
// `dtype`; exp_avg, exp_avg_sq and max_exp_avg_sq (0 = no AMSGrad) always float32. step_size =
// lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step) come from the host.
void adam(int device, int dtype, uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
          uintptr_t max_exp_avg_sq, int64_t n, double lr, double beta1, double beta2, double eps,
          double weight_decay, double step_size, double bc2_sqrt, bool decoupled, bool maximize, uintptr_t stream,
          int variant);

}  // namespace fastnn::cuda
