// Fused Adam/AdamW/AMSGrad step: one pass reading param, grad and the moments and writing them back.
// The arithmetic follows torch.optim.Adam (single-tensor path) operation for operation; the loop is plain
// scalar code that the compiler vectorizes for the unit's ISA (sqrt and division included).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/half.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

constexpr int64_t kAdamGrain = 1 << 15;

// kDecay: 0 = no weight decay, 1 = L2 (added to the gradient), 2 = decoupled (AdamW).
template <typename T, bool kAmsgrad, int kDecay>
static void adam_range(const AdamArgs<T>& a, int64_t b, int64_t e) {
  T* FASTNN_RESTRICT p = a.param;
  const T* FASTNN_RESTRICT g = a.grad;
  T* FASTNN_RESTRICT m = a.exp_avg;
  T* FASTNN_RESTRICT v = a.exp_avg_sq;
  T* FASTNN_RESTRICT vmax = a.max_exp_avg_sq;
  const T sign = a.maximize ? T(-1) : T(1);
  const T wd = T(a.weight_decay);
  const T decay = T(1 - a.lr * a.weight_decay);
  // torch's lerp(self, end, w) = self + w * (end - self) for w < 0.5, else end - (end - self) * (1 - w).
  const T w1 = T(1 - a.beta1);
  const bool lerp_low = (1 - a.beta1) < 0.5;
  const T w1c = T(1) - w1;
  const T beta2 = T(a.beta2), one_minus_beta2 = T(1 - a.beta2);
  const T bc2 = T(a.bias_correction2_sqrt), eps = T(a.eps), neg_step = T(-a.step_size);
#pragma GCC ivdep
  for (int64_t i = b; i < e; ++i) {
    T gi = sign * g[i];
    T pi = p[i];
    if (kDecay == 2) pi = pi * decay;
    if (kDecay == 1) gi = gi + wd * pi;
    T mi = m[i];
    T diff = gi - mi;
    mi = lerp_low ? mi + w1 * diff : gi - diff * w1c;
    T vi = v[i] * beta2 + one_minus_beta2 * gi * gi;
    T vd = vi;
    if (kAmsgrad) {
      T vm = vmax[i];
      // np.maximum / torch.maximum: a NaN in either operand is the result (vm < vi alone drops a NaN vi).
      vm = (vm < vi || vi != vi) ? vi : vm;
      vmax[i] = vm;
      vd = vm;
    }
    T denom = std::sqrt(vd) / bc2 + eps;
    p[i] = pi + neg_step * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

template <typename T> static void adam_dispatch(const AdamArgs<T>& a, int64_t b, int64_t e) {
  // torch skips the decay entirely when weight_decay == 0 (0 * inf would otherwise give NaN).
  const int decay = a.weight_decay == 0 ? 0 : (a.decoupled ? 2 : 1);
  const bool ams = a.max_exp_avg_sq != nullptr;
  if (decay == 0) ams ? adam_range<T, true, 0>(a, b, e) : adam_range<T, false, 0>(a, b, e);
  if (decay == 1) ams ? adam_range<T, true, 1>(a, b, e) : adam_range<T, false, 1>(a, b, e);
  if (decay == 2) ams ? adam_range<T, true, 2>(a, b, e) : adam_range<T, false, 2>(a, b, e);
}

// Elements [b, e) of one tensor. Vector accesses aligned to param (NumPy buffers are 16-byte aligned; a
// split cache line per access costs): the head up to the next 64-byte boundary goes through the same loop
// first.
template <typename T> static void adam_chunk(const AdamArgs<T>& a, int64_t b, int64_t e) {
  const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(a.param + b) % 64) / int64_t(sizeof(T));
  if (mis) {
    const int64_t h = std::min(e, b + 64 / int64_t(sizeof(T)) - mis);
    adam_dispatch(a, b, h);
    b = h;
  }
  adam_dispatch(a, b, e);
}

template <typename T> void adam(const AdamArgs<T>& a) {
  parallel_for(a.n, kAdamGrain, [&](int64_t b, int64_t e) { adam_chunk(a, b, e); });
}

// Many tensors in one call: each is cut into chunks of kAdamGrain elements (a small tensor is one chunk)
// and the threads take equal runs of the list of all chunks, so 100 tensors of 10^4 elements cost one
// parallel region instead of 100.
template <typename T> void adam_multi(const AdamArgs<T>* args, int64_t count) {
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);  // chunk index where tensor i starts
  for (int64_t i = 0; i < count; ++i)
    first[i + 1] = first[i] + (args[i].n + kAdamGrain - 1) / kAdamGrain;
  const int64_t chunks = first[count];
  // At least ~kAdamGrain elements per thread: tiny steps stay on the calling thread.
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += args[i].n;
  const int64_t grain = std::max<int64_t>(1, chunks * kAdamGrain / std::max<int64_t>(total, 1));
  parallel_for(chunks, grain, [&](int64_t cb, int64_t ce) {
    int64_t t = std::upper_bound(first.begin(), first.end(), cb) - first.begin() - 1;
    for (int64_t c = cb; c < ce; ++c) {
      while (c >= first[t + 1]) ++t;
      const int64_t b = (c - first[t]) * kAdamGrain;
      adam_chunk(args[t], b, std::min(args[t].n, b + kAdamGrain));
    }
  });
}

// float16 / bfloat16 parameters (and moments when half_states): blocks of kHalfBlock elements are widened
// into float32 buffers on the stack, stepped by the float32 loop above (float32 moments are used in place)
// and rounded back, so the arrays move at half width and the arithmetic is the float32 step's.
constexpr int64_t kHalfBlock = 512;

static void adam_half_range(const AdamHalfArgs a, int64_t b, int64_t e) {  // a copy per thread
  alignas(64) float p[kHalfBlock], g[kHalfBlock], m[kHalfBlock], v[kHalfBlock], vm[kHalfBlock];
  const bool ams = a.half_states ? a.vmax16 != nullptr : a.h.max_exp_avg_sq != nullptr;
  for (int64_t i = b; i < e; i += kHalfBlock) {
    const int64_t n = std::min(kHalfBlock, e - i);
    AdamArgs<float> f = a.h;
    widen_range(a.param + i, p, 0, n, a.bf16);
    widen_range(a.grad + i, g, 0, n, a.bf16);
    f.param = p, f.grad = g;
    if (a.half_states) {
      widen_range(a.m16 + i, m, 0, n, a.bf16);
      widen_range(a.v16 + i, v, 0, n, a.bf16);
      if (ams) widen_range(a.vmax16 + i, vm, 0, n, a.bf16);
      f.exp_avg = m, f.exp_avg_sq = v, f.max_exp_avg_sq = ams ? vm : nullptr;
    } else {
      f.exp_avg = a.h.exp_avg + i, f.exp_avg_sq = a.h.exp_avg_sq + i;
      f.max_exp_avg_sq = ams ? a.h.max_exp_avg_sq + i : nullptr;
    }
    adam_dispatch(f, 0, n);
    narrow_range(p, a.param + i, 0, n, a.bf16);
    if (a.half_states) {
      narrow_range(m, a.m16 + i, 0, n, a.bf16);
      narrow_range(v, a.v16 + i, 0, n, a.bf16);
      if (ams) narrow_range(vm, a.vmax16 + i, 0, n, a.bf16);
    }
  }
}

void adam_half(const AdamHalfArgs& a) {
  parallel_for(a.h.n, kAdamGrain, [&](int64_t b, int64_t e) { adam_half_range(a, b, e); });
}

template void adam<float>(const AdamArgs<float>&);
template void adam<double>(const AdamArgs<double>&);
template void adam_multi<float>(const AdamArgs<float>*, int64_t);
template void adam_multi<double>(const AdamArgs<double>*, int64_t);

}  // namespace fastnn::cpu::FASTNN_ISA
