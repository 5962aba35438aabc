// Shared by every fastnn CUDA op: error checks that throw (pybind11 turns them into RuntimeError naming
// the op), float/half conversions, warp and block reductions, 16-byte vector types, launch helpers.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastnn::cuda {

// ---- errors ----------------------------------------------------------------------------------------
// Every CUDA runtime call goes through FASTNN_CUDA_CHECK(op, call): a failure throws std::runtime_error
// "fastnn.<op>: <CUDA error name>: <description> (<call> at file:line)", never aborts the process.
[[noreturn]] inline void cuda_fail(const char* op, cudaError_t err, const char* call, const char* file, int line) {
  throw std::runtime_error(std::string("fastnn.") + op + ": CUDA error " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err) + " (" + call + " at " + file + ":" + std::to_string(line) + ")");
}
#define FASTNN_CUDA_CHECK(op, call)                                                  \
  do {                                                                               \
    cudaError_t fastnn_err_ = (call);                                                \
    if (fastnn_err_ != cudaSuccess) ::fastnn::cuda::cuda_fail(op, fastnn_err_, #call, __FILE__, __LINE__); \
  } while (0)
// After a launch: a bad configuration shows up in cudaGetLastError (execution errors surface later, at the
// next synchronizing call, which also goes through FASTNN_CUDA_CHECK).
#define FASTNN_CHECK_LAUNCH(op) FASTNN_CUDA_CHECK(op, cudaGetLastError())

// dtype codes passed from Python (fastnn/_gpu.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1 };

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T> inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Launches go to the device that holds the arrays (Python passes cupy's current device).
inline void set_device(const char* op, int device) {
  int cur = -1;
  FASTNN_CUDA_CHECK(op, cudaGetDevice(&cur));
  if (cur != device) FASTNN_CUDA_CHECK(op, cudaSetDevice(device));
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `work` items: enough blocks to fill the device a few times over,
// never more than the work needs.
inline unsigned grid_for(int64_t work, int threads) {
  int64_t blocks = ceil_div(work, threads);
  const int64_t cap = 65536;  // 8+ waves on any current GPU; the loop strides over the rest
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// ---- conversions -----------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// exp(a - b) with exp(-inf - anything) = 0: the online-softmax merge of an empty or all -inf part must not
// produce exp(-inf - (-inf)) = NaN.
// (A NaN a is not -inf: it gives NaN.)
__device__ __forceinline__ float exp_diff(float a, float b) { return a == -INFINITY ? 0.f : expf(a - b); }

// ---- reductions ------------------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
// fmaxf drops NaN: callers carry a NaN by other means (attention: see its running max).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Online softmax state (running max m, sum s of exp(x - m)); merge keeps the invariant s = sum exp(x - m).
// NaN in x is carried by s (fmaxf drops NaN from m, but exp(NaN - m) = NaN poisons s), +inf by
// exp(inf - inf) = NaN: either way the row's softmax is NaN, as NumPy's formula gives.
struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum maxsum_add(MaxSum a, float x) {
  float m = fmaxf(a.m, x);
  return {m, a.s * exp_diff(a.m, m) + exp_diff(x, m)};
}
__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
  float m = fmaxf(a.m, b.m);
  return {m, a.s * exp_diff(a.m, m) + b.s * exp_diff(b.m, m)};
}
__device__ __forceinline__ MaxSum warp_maxsum(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum w{__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
    v = maxsum_merge(v, w);
  }
  return v;
}

// Block-wide reductions for blockDim.x a multiple of 32 (<= 1024); `scratch` holds 32 entries. Every
// thread gets the result. The leading __syncthreads makes back-to-back calls on one scratch safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ MaxSum block_maxsum(MaxSum v, MaxSum* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_maxsum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : MaxSum{-INFINITY, 0.f};
  return warp_maxsum(v);
}

// ---- 16-byte vectors -------------------------------------------------------------------------------
// Vec<T>: 16 bytes of T (4 floats or 8 halves) loaded/stored in one instruction. Callers use it only when
// every pointer is 16-byte aligned (checked on the host by aligned16).
template <typename T> struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};
inline bool aligned16(uintptr_t p) { return (p & 15u) == 0; }

}  // namespace fastnn::cuda
