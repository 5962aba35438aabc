// Fused Adam / AdamW / AMSGrad step, in place, with torch.optim.Adam's arithmetic (the CPU kernel's order of
// operations). param and grad are float32 or float16; the moments are always float32 (for float16 params
// this is the usual mixed-precision recipe: float16 moments would underflow). All step-dependent scalars
// (bias corrections, step size) are computed once on the host.
#include "common.cuh"
#include "ops.h"

namespace fastnn::cuda {
namespace {

struct AdamScalars {
  float sign, wd, decay, w1, w1c, beta2, one_minus_beta2, bc2, eps, neg_step;
  bool lerp_low;  // torch's lerp(m, g, w) = m + w (g - m) for w < 0.5, else g - (g - m)(1 - w)
};

// One element: kDecay 0 = none, 1 = L2 (added to the gradient), 2 = decoupled (AdamW).
template <bool kAmsgrad, int kDecay>
__device__ __forceinline__ void adam1(const AdamScalars& a, float& p, float g, float& m, float& v, float* vmax) {
  g = a.sign * g;
  if (kDecay == 2) p = p * a.decay;
  if (kDecay == 1) g = g + a.wd * p;
  const float diff = g - m;
  m = a.lerp_low ? m + a.w1 * diff : g - diff * a.w1c;
  v = v * a.beta2 + a.one_minus_beta2 * g * g;
  float vd = v;
  if (kAmsgrad) {
    // torch.maximum: a NaN in either operand is the result (*vmax < v alone drops a NaN v; fmaxf drops both).
    *vmax = (*vmax < v || v != v) ? v : *vmax;
    vd = *vmax;
  }
  const float denom = sqrtf(vd) / a.bc2 + a.eps;
  p = p + a.neg_step * (m / denom);
}

// ---- plain kernel: one element per iteration, runtime flags ----------------------------------------
template <typename T>
__global__ void adam_plain(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                           float* __restrict__ vmax, int64_t n, AdamScalars a, int decay) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float pi = to_f(p[i]), mi = m[i], vi = v[i];
    const float gi = to_f(g[i]);
    if (vmax) {
      if (decay == 0) adam1<true, 0>(a, pi, gi, mi, vi, vmax + i);
      if (decay == 1) adam1<true, 1>(a, pi, gi, mi, vi, vmax + i);
      if (decay == 2) adam1<true, 2>(a, pi, gi, mi, vi, vmax + i);
    } else {
      if (decay == 0) adam1<false, 0>(a, pi, gi, mi, vi, nullptr);
      if (decay == 1) adam1<false, 1>(a, pi, gi, mi, vi, nullptr);
      if (decay == 2) adam1<false, 2>(a, pi, gi, mi, vi, nullptr);
    }
    p[i] = from_f<T>(pi);
    m[i] = mi;
    v[i] = vi;
  }
}

// ---- vectorized kernel: 4 elements per iteration (16-byte state accesses, 16 or 8 bytes of param/grad) ----
template <typename T> struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T, bool kAmsgrad, int kDecay>
__global__ void adam_vec(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                         float* __restrict__ vmax, int64_t n, AdamScalars a) {
  const int64_t nv = n / 4, tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < nv; i += stride) {
    Pack4<T> pp = reinterpret_cast<const Pack4<T>*>(p)[i];
    const Pack4<T> gg = reinterpret_cast<const Pack4<T>*>(g)[i];
    const float4 m4 = reinterpret_cast<const float4*>(m)[i];
    const float4 v4 = reinterpret_cast<const float4*>(v)[i];
    const float4 x4 = kAmsgrad ? reinterpret_cast<const float4*>(vmax)[i] : float4{};
    float mf[4] = {m4.x, m4.y, m4.z, m4.w}, vf[4] = {v4.x, v4.y, v4.z, v4.w}, xf[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float pj = to_f(pp.v[j]);
      adam1<kAmsgrad, kDecay>(a, pj, to_f(gg.v[j]), mf[j], vf[j], &xf[j]);
      pp.v[j] = from_f<T>(pj);
    }
    reinterpret_cast<Pack4<T>*>(p)[i] = pp;
    reinterpret_cast<float4*>(m)[i] = make_float4(mf[0], mf[1], mf[2], mf[3]);
    reinterpret_cast<float4*>(v)[i] = make_float4(vf[0], vf[1], vf[2], vf[3]);
    if (kAmsgrad) reinterpret_cast<float4*>(vmax)[i] = make_float4(xf[0], xf[1], xf[2], xf[3]);
  }
  for (int64_t i = nv * 4 + tid; i < n; i += stride) {  // the < 4 tail
    float pi = to_f(p[i]), mi = m[i], vi = v[i];
    adam1<kAmsgrad, kDecay>(a, pi, to_f(g[i]), mi, vi, kAmsgrad ? vmax + i : nullptr);
    p[i] = from_f<T>(pi);
    m[i] = mi;
    v[i] = vi;
  }
}

constexpr int kThreads = 256;

template <typename T>
void launch_adam(T* p, const T* g, float* m, float* v, float* vmax, int64_t n, const AdamScalars& a, int decay,
                 cudaStream_t s, int variant) {
  const bool vec = variant != 0 && aligned16(uintptr_t(p)) && aligned16(uintptr_t(g)) && aligned16(uintptr_t(m)) &&
                   aligned16(uintptr_t(v)) && (!vmax || aligned16(uintptr_t(vmax)));
  if (!vec) {
    adam_plain<T><<<grid_for(n, kThreads), kThreads, 0, s>>>(p, g, m, v, vmax, n, a, decay);
  } else {
    const unsigned grid = grid_for(ceil_div(n, 4), kThreads);
    const bool ams = vmax != nullptr;
#define FASTNN_ADAM_VEC(AMS, DECAY) adam_vec<T, AMS, DECAY><<<grid, kThreads, 0, s>>>(p, g, m, v, vmax, n, a)
    if (decay == 0) ams ? FASTNN_ADAM_VEC(true, 0) : FASTNN_ADAM_VEC(false, 0);
    if (decay == 1) ams ? FASTNN_ADAM_VEC(true, 1) : FASTNN_ADAM_VEC(false, 1);
    if (decay == 2) ams ? FASTNN_ADAM_VEC(true, 2) : FASTNN_ADAM_VEC(false, 2);
#undef FASTNN_ADAM_VEC
  }
  FASTNN_CHECK_LAUNCH("adam_update");
}

}  // namespace

void adam(int device, int dtype, uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq,
          uintptr_t max_exp_avg_sq, int64_t n, double lr, double beta1, double beta2, double eps,
          double weight_decay, double step_size, double bc2_sqrt, bool decoupled, bool maximize, uintptr_t stream,
          int variant) {
  if (n <= 0) return;
  set_device("adam_update", device);
  AdamScalars a;
  a.sign = maximize ? -1.f : 1.f;
  a.wd = float(weight_decay);
  a.decay = float(1 - lr * weight_decay);
  a.w1 = float(1 - beta1);
  a.w1c = 1.f - a.w1;
  a.lerp_low = (1 - beta1) < 0.5;
  a.beta2 = float(beta2);
  a.one_minus_beta2 = float(1 - beta2);
  a.bc2 = float(bc2_sqrt);
  a.eps = float(eps);
  a.neg_step = float(-step_size);
  // torch skips the decay entirely when weight_decay == 0 (0 * inf would otherwise give NaN).
  const int decay = weight_decay == 0 ? 0 : (decoupled ? 2 : 1);
  float* m = as_ptr<float>(exp_avg);
  float* v = as_ptr<float>(exp_avg_sq);
  float* vmax = as_ptr<float>(max_exp_avg_sq);
  if (dtype == kFloat32)
    launch_adam(as_ptr<float>(param), as_ptr<const float>(grad), m, v, vmax, n, a, decay, as_stream(stream), variant);
  else
    launch_adam(as_ptr<__half>(param), as_ptr<const __half>(grad), m, v, vmax, n, a, decay, as_stream(stream), variant);
}

}  // namespace fastnn::cuda
