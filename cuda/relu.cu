// relu and relu_backward: element-wise, memory bound. The plain kernels (one element per iteration) are
// the references; the fast ones move 16 bytes per load/store with a grid-stride loop.
#include "common.cuh"
#include "ops.h"

namespace fastnn::cuda {
namespace {

// max(x, 0) with NaN kept: !(x <= 0) is true for NaN.
template <typename T> __device__ __forceinline__ T relu1(T x) { return !(to_f(x) <= 0.f) ? x : from_f<T>(0.f); }
// NaN x: relu1 keeps it (np.maximum); relu_grad1 gives 0, deliberately, as the CPU kernel (jax.nn.relu's rule).
template <typename T> __device__ __forceinline__ T relu_grad1(T g, T x) { return to_f(x) > 0.f ? g : from_f<T>(0.f); }

// ---- plain kernels -----------------------------------------------------------------------------------
// y may equal x: every element is read and then written by the same thread, once.
template <typename T> __global__ void relu_plain(const T* x, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = relu1(x[i]);
}
template <typename T> __global__ void relu_backward_plain(const T* g, const T* x, T* dx, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = relu_grad1(g[i], x[i]);
}

// ---- vectorized kernels ------------------------------------------------------------------------------
// nv = n / Vec::N whole vectors through 16-byte accesses, then the < Vec::N tail element by element.
template <typename T> __global__ void relu_vec(const T* x, T* y, int64_t n) {
  using V = Vec<T>;
  const int64_t nv = n / V::N, tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const V* xv = reinterpret_cast<const V*>(x);
  V* yv = reinterpret_cast<V*>(y);
  for (int64_t i = tid; i < nv; i += stride) {
    V a = xv[i];
#pragma unroll
    for (int j = 0; j < V::N; ++j) a.v[j] = relu1(a.v[j]);
    yv[i] = a;
  }
  for (int64_t i = nv * V::N + tid; i < n; i += stride) y[i] = relu1(x[i]);
}
// No __restrict__ in this file: out= may be an input (in place), and each element is read, then written, by
// one thread exactly once, so aliasing is harmless.
template <typename T> __global__ void relu_backward_vec(const T* g, const T* x, T* dx, int64_t n) {
  using V = Vec<T>;
  const int64_t nv = n / V::N, tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const V* gv = reinterpret_cast<const V*>(g);
  const V* xv = reinterpret_cast<const V*>(x);
  V* dv = reinterpret_cast<V*>(dx);
  for (int64_t i = tid; i < nv; i += stride) {
    V a = gv[i];
    const V b = xv[i];
#pragma unroll
    for (int j = 0; j < V::N; ++j) a.v[j] = relu_grad1(a.v[j], b.v[j]);
    dv[i] = a;
  }
  for (int64_t i = nv * V::N + tid; i < n; i += stride) dx[i] = relu_grad1(g[i], x[i]);
}

constexpr int kThreads = 256;

// ---- launchers ---------------------------------------------------------------------------------------
template <typename T> void launch_relu(const T* x, T* y, int64_t n, cudaStream_t s, int variant) {
  const bool vec = variant != 0 && aligned16(uintptr_t(x)) && aligned16(uintptr_t(y));
  const int64_t work = vec ? ceil_div(n, Vec<T>::N) : n;
  if (vec)
    relu_vec<T><<<grid_for(work, kThreads), kThreads, 0, s>>>(x, y, n);
  else
    relu_plain<T><<<grid_for(work, kThreads), kThreads, 0, s>>>(x, y, n);
  FASTNN_CHECK_LAUNCH("relu");
}
template <typename T> void launch_relu_backward(const T* g, const T* x, T* dx, int64_t n, cudaStream_t s, int variant) {
  const bool vec = variant != 0 && aligned16(uintptr_t(g)) && aligned16(uintptr_t(x)) && aligned16(uintptr_t(dx));
  const int64_t work = vec ? ceil_div(n, Vec<T>::N) : n;
  if (vec)
    relu_backward_vec<T><<<grid_for(work, kThreads), kThreads, 0, s>>>(g, x, dx, n);
  else
    relu_backward_plain<T><<<grid_for(work, kThreads), kThreads, 0, s>>>(g, x, dx, n);
  FASTNN_CHECK_LAUNCH("relu_backward");
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------------
void relu(int device, int dtype, uintptr_t x, uintptr_t y, int64_t n, uintptr_t stream, int variant) {
  if (n <= 0) return;
  set_device("relu", device);
  if (dtype == kFloat32)
    launch_relu(as_ptr<const float>(x), as_ptr<float>(y), n, as_stream(stream), variant);
  else
    launch_relu(as_ptr<const __half>(x), as_ptr<__half>(y), n, as_stream(stream), variant);
}

void relu_backward(int device, int dtype, uintptr_t g, uintptr_t x, uintptr_t dx, int64_t n, uintptr_t stream,
                   int variant) {
  if (n <= 0) return;
  set_device("relu_backward", device);
  if (dtype == kFloat32)
    launch_relu_backward(as_ptr<const float>(g), as_ptr<const float>(x), as_ptr<float>(dx), n, as_stream(stream),
                         variant);
  else
    launch_relu_backward(as_ptr<const __half>(g), as_ptr<const __half>(x), as_ptr<__half>(dx), n, as_stream(stream),
                         variant);
}

}  // namespace fastnn::cuda
