// The softmax family over the last axis of contiguous (rows, cols) arrays: softmax / log_softmax, their
// backward, and the fused cross-entropy (loss + gradient in one pass). float32 or float16 storage, float32
// arithmetic. Plain kernels: one thread per row (the references). Fast kernels: one warp per row when
// cols <= kWarpCols, else one block per row; both keep an online (max, sum) so a row is read once to
// reduce and once to write (the second read mostly hits L1/L2).
#include "common.cuh"
#include "ops.h"

namespace fastnn::cuda {
namespace {

constexpr int64_t kWarpCols = 1024;  // up to 32 elements per lane; longer rows get a whole block
constexpr int kWarpThreads = 256;    // 8 rows per block in the warp-per-row kernels
constexpr int kBlockThreads = 512;   // one long row per block

// Row partition shared by the fast kernels: kBlock = block per row, else warp per row. `row` is uniform
// across the threads that share it, so the early return never splits a reduction.
template <bool kBlock> struct RowGroup {
  int64_t row;
  int lane, width;
  __device__ RowGroup() {
    if (kBlock) {
      row = blockIdx.x;
      lane = threadIdx.x;
      width = blockDim.x;
    } else {
      row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
      lane = threadIdx.x & 31;
      width = 32;
    }
  }
};
template <bool kBlock> __device__ __forceinline__ MaxSum group_maxsum(MaxSum v, MaxSum* scratch) {
  if constexpr (kBlock) return block_maxsum(v, scratch);
  else return warp_maxsum(v);
}
template <bool kBlock> __device__ __forceinline__ float group_sum(float v, float* scratch) {
  if constexpr (kBlock) return block_sum(v, scratch);
  else return warp_sum(v);
}

// ---- softmax / log_softmax -------------------------------------------------------------------------
// Plain: the NumPy formula, one thread per row. y may equal x (each element is read before it is written).
template <typename T> __global__ void softmax_plain(const T* x, T* y, int64_t rows, int64_t cols, bool log) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const T* xr = x + r * cols;
  T* yr = y + r * cols;
  float m = -INFINITY, s = 0.f;
  // fmaxf drops a NaN, deliberately: it is carried by the sum (expf(NaN - m) = NaN), which makes the row NaN.
  for (int64_t j = 0; j < cols; ++j) m = fmaxf(m, to_f(xr[j]));
  for (int64_t j = 0; j < cols; ++j) s += expf(to_f(xr[j]) - m);
  for (int64_t j = 0; j < cols; ++j) {
    const float d = to_f(xr[j]) - m;
    yr[j] = from_f<T>(log ? d - logf(s) : expf(d) / s);
  }
}

template <typename T, bool kBlock> __global__ void softmax_fast(const T* x, T* y, int64_t rows, int64_t cols, bool log) {
  __shared__ MaxSum scratch[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* xr = x + g.row * cols;
  T* yr = y + g.row * cols;
  MaxSum ms{-INFINITY, 0.f};
  for (int64_t j = g.lane; j < cols; j += g.width) ms = maxsum_add(ms, to_f(xr[j]));
  ms = group_maxsum<kBlock>(ms, scratch);
  const float inv = 1.f / ms.s, log_s = logf(ms.s);
  for (int64_t j = g.lane; j < cols; j += g.width) {
    const float d = to_f(xr[j]) - ms.m;
    yr[j] = from_f<T>(log ? d - log_s : expf(d) * inv);
  }
}

// ---- backward ----------------------------------------------------------------------------------------
// softmax: dx = y * (g - sum(g * y)); log_softmax (y = log p): dx = g - exp(y) * sum(g).
template <typename T>
__global__ void softmax_backward_plain(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ dx,
                                       int64_t rows, int64_t cols, bool log) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const T *gr = g + r * cols, *yr = y + r * cols;
  T* dr = dx + r * cols;
  float dot = 0.f;
  for (int64_t j = 0; j < cols; ++j) dot += log ? to_f(gr[j]) : to_f(gr[j]) * to_f(yr[j]);
  for (int64_t j = 0; j < cols; ++j)
    dr[j] = from_f<T>(log ? to_f(gr[j]) - expf(to_f(yr[j])) * dot : to_f(yr[j]) * (to_f(gr[j]) - dot));
}

template <typename T, bool kBlock>
__global__ void softmax_backward_fast(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ dx,
                                      int64_t rows, int64_t cols, bool log) {
  __shared__ float scratch[32];
  const RowGroup<kBlock> grp;
  if (grp.row >= rows) return;
  const T *gr = g + grp.row * cols, *yr = y + grp.row * cols;
  T* dr = dx + grp.row * cols;
  float dot = 0.f;
  for (int64_t j = grp.lane; j < cols; j += grp.width) dot += log ? to_f(gr[j]) : to_f(gr[j]) * to_f(yr[j]);
  dot = group_sum<kBlock>(dot, scratch);
  for (int64_t j = grp.lane; j < cols; j += grp.width) {
    const float gj = to_f(gr[j]), yj = to_f(yr[j]);
    dr[j] = from_f<T>(log ? gj - expf(yj) * dot : yj * (gj - dot));
  }
}

// ---- cross-entropy -----------------------------------------------------------------------------------
// row_loss[r] = (m - x[label]) + log(s) (= -log_softmax(x)[label]; m + log(s) first would lose log(s) next
// to a large m); grad = (exp(x - m) / s - onehot) * scale. A row labelled ignore_index gets zero loss and
// zero gradient.
template <typename T>
__global__ void cross_entropy_plain(const T* __restrict__ x, const int64_t* __restrict__ labels, T* __restrict__ grad,
                                    float* __restrict__ row_loss, int64_t rows, int64_t cols, float scale,
                                    int64_t ignore_index) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const T* xr = x + r * cols;
  T* gr = grad + r * cols;
  const int64_t label = labels[r];
  if (label == ignore_index) {
    for (int64_t j = 0; j < cols; ++j) gr[j] = from_f<T>(0.f);
    row_loss[r] = 0.f;
    return;
  }
  float m = -INFINITY, s = 0.f;
  // fmaxf drops a NaN, deliberately: it is carried by the sum s, which makes the row and the loss NaN.
  for (int64_t j = 0; j < cols; ++j) m = fmaxf(m, to_f(xr[j]));
  for (int64_t j = 0; j < cols; ++j) s += expf(to_f(xr[j]) - m);
  for (int64_t j = 0; j < cols; ++j) gr[j] = from_f<T>((expf(to_f(xr[j]) - m) / s - (j == label ? 1.f : 0.f)) * scale);
  row_loss[r] = (m - to_f(xr[label])) + logf(s);
}

template <typename T, bool kBlock>
__global__ void cross_entropy_fast(const T* __restrict__ x, const int64_t* __restrict__ labels, T* __restrict__ grad,
                                   float* __restrict__ row_loss, int64_t rows, int64_t cols, float scale,
                                   int64_t ignore_index) {
  __shared__ MaxSum scratch[32];
  const RowGroup<kBlock> g;
  if (g.row >= rows) return;
  const T* xr = x + g.row * cols;
  T* gr = grad + g.row * cols;
  const int64_t label = labels[g.row];
  if (label == ignore_index) {  // uniform across the row's group: no thread reaches the reductions below
    for (int64_t j = g.lane; j < cols; j += g.width) gr[j] = from_f<T>(0.f);
    if (g.lane == 0) row_loss[g.row] = 0.f;
    return;
  }
  MaxSum ms{-INFINITY, 0.f};
  for (int64_t j = g.lane; j < cols; j += g.width) ms = maxsum_add(ms, to_f(xr[j]));
  ms = group_maxsum<kBlock>(ms, scratch);
  const float inv = 1.f / ms.s;
  for (int64_t j = g.lane; j < cols; j += g.width)
    gr[j] = from_f<T>((expf(to_f(xr[j]) - ms.m) * inv - (j == label ? 1.f : 0.f)) * scale);
  if (g.lane == 0) row_loss[g.row] = (ms.m - to_f(xr[label])) + logf(ms.s);
}

// ---- launchers ---------------------------------------------------------------------------------------
// Grid shapes: plain = one thread per row; warp = 8 rows per block; block = one row per block.
inline unsigned blocks_for(int64_t rows, int per_block) { return static_cast<unsigned>(ceil_div(rows, per_block)); }

template <typename T> void launch_softmax(const T* x, T* y, int64_t rows, int64_t cols, bool log, cudaStream_t s, int variant) {
  if (variant == 0)
    softmax_plain<T><<<blocks_for(rows, 128), 128, 0, s>>>(x, y, rows, cols, log);
  else if (cols <= kWarpCols)
    softmax_fast<T, false><<<blocks_for(rows, kWarpThreads / 32), kWarpThreads, 0, s>>>(x, y, rows, cols, log);
  else
    softmax_fast<T, true><<<blocks_for(rows, 1), kBlockThreads, 0, s>>>(x, y, rows, cols, log);
  FASTNN_CHECK_LAUNCH(log ? "log_softmax" : "softmax");
}

template <typename T>
void launch_softmax_backward(const T* g, const T* y, T* dx, int64_t rows, int64_t cols, bool log, cudaStream_t s,
                             int variant) {
  if (variant == 0)
    softmax_backward_plain<T><<<blocks_for(rows, 128), 128, 0, s>>>(g, y, dx, rows, cols, log);
  else if (cols <= kWarpCols)
    softmax_backward_fast<T, false><<<blocks_for(rows, kWarpThreads / 32), kWarpThreads, 0, s>>>(g, y, dx, rows, cols, log);
  else
    softmax_backward_fast<T, true><<<blocks_for(rows, 1), kBlockThreads, 0, s>>>(g, y, dx, rows, cols, log);
  FASTNN_CHECK_LAUNCH(log ? "log_softmax_backward" : "softmax_backward");
}

template <typename T>
void launch_cross_entropy(const T* x, const int64_t* labels, T* grad, float* row_loss, int64_t rows, int64_t cols,
                          float scale, int64_t ignore_index, cudaStream_t s, int variant) {
  if (variant == 0)
    cross_entropy_plain<T><<<blocks_for(rows, 128), 128, 0, s>>>(x, labels, grad, row_loss, rows, cols, scale,
                                                                  ignore_index);
  else if (cols <= kWarpCols)
    cross_entropy_fast<T, false><<<blocks_for(rows, kWarpThreads / 32), kWarpThreads, 0, s>>>(x, labels, grad, row_loss,
                                                                                            rows, cols, scale,
                                                                                            ignore_index);
  else
    cross_entropy_fast<T, true><<<blocks_for(rows, 1), kBlockThreads, 0, s>>>(x, labels, grad, row_loss, rows, cols,
                                                                             scale, ignore_index);
  FASTNN_CHECK_LAUNCH("cross_entropy");
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------------------
void softmax(int device, int dtype, uintptr_t x, uintptr_t y, int64_t rows, int64_t cols, bool log,
             uintptr_t stream, int variant) {
  if (rows <= 0 || cols <= 0) return;
  set_device(log ? "log_softmax" : "softmax", device);
  if (dtype == kFloat32)
    launch_softmax(as_ptr<const float>(x), as_ptr<float>(y), rows, cols, log, as_stream(stream), variant);
  else
    launch_softmax(as_ptr<const __half>(x), as_ptr<__half>(y), rows, cols, log, as_stream(stream), variant);
}

void softmax_backward(int device, int dtype, uintptr_t g, uintptr_t y, uintptr_t dx, int64_t rows, int64_t cols,
                      bool log, uintptr_t stream, int variant) {
  if (rows <= 0 || cols <= 0) return;
  set_device(log ? "log_softmax_backward" : "softmax_backward", device);
  if (dtype == kFloat32)
    launch_softmax_backward(as_ptr<const float>(g), as_ptr<const float>(y), as_ptr<float>(dx), rows, cols, log,
                            as_stream(stream), variant);
  else
    launch_softmax_backward(as_ptr<const __half>(g), as_ptr<const __half>(y), as_ptr<__half>(dx), rows, cols, log,
                            as_stream(stream), variant);
}

void cross_entropy(int device, int dtype, uintptr_t logits, uintptr_t labels, uintptr_t grad, uintptr_t row_loss,
                   int64_t rows, int64_t cols, float grad_scale, int64_t ignore_index, uintptr_t stream, int variant) {
  if (rows <= 0 || cols <= 0) return;
  set_device("cross_entropy", device);
  if (dtype == kFloat32)
    launch_cross_entropy(as_ptr<const float>(logits), as_ptr<const int64_t>(labels), as_ptr<float>(grad),
                         as_ptr<float>(row_loss), rows, cols, grad_scale, ignore_index, as_stream(stream), variant);
  else
    launch_cross_entropy(as_ptr<const __half>(logits), as_ptr<const int64_t>(labels), as_ptr<__half>(grad),
                         as_ptr<float>(row_loss), rows, cols, grad_scale, ignore_index, as_stream(stream), variant);
}

}  // namespace fastnn::cuda
