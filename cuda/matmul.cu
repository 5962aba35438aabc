// Batched GEMM with a fused epilogue: C[z] = A[z] @ B[z] (+ bias) (relu), for matmul and linear.
// Operands are read through (row, column) element strides plus a per-batch offset array, so transposed
// views and broadcast batches need no copies. Three kernels:
//   gemm_plain   one thread per output, float accumulation: the reference for both dtypes.
//   sgemm_tiled  float32: 128x128x8 block tile, 8x8 outputs per thread in registers, double-buffered
//                shared memory (one __syncthreads per k-step).
//   hgemm_wmma   float16: tensor cores through WMMA (16x16x16, float accumulation), 128x128x32 block tile,
//                8 warps each owning 64x32 of C, double-buffered shared memory.
// Every kernel walks its tiles with grid-stride loops over y (M) and z (batch), so any size fits in the
// grid limits.
#include <mma.h>

#include "common.cuh"
#include "ops.h"

namespace fastnn::cuda {
namespace {

// Epilogue shared by all kernels: bias, then relu (NaN kept, as the CPU path).
template <typename T>
__device__ __forceinline__ float epilogue(float acc, const T* __restrict__ bias, int64_t n, bool relu) {
  if (bias) acc += to_f(bias[n]);
  if (relu) acc = !(acc <= 0.f) ? acc : 0.f;  // NaN kept, as np.maximum
  return acc;
}

struct GemmArgs {
  const void* a;
  const void* b;
  void* c;
  const int64_t* a_off;
  const int64_t* b_off;
  const void* bias;
  int64_t batch, M, N, K, a_rs, a_cs, b_rs, b_cs;
  bool relu;
};

// ---- plain ---------------------------------------------------------------------------------------------
template <typename T> __global__ void gemm_plain(GemmArgs g) {
  const T* __restrict__ a = static_cast<const T*>(g.a);
  const T* __restrict__ b = static_cast<const T*>(g.b);
  T* __restrict__ c = static_cast<T*>(g.c);
  const T* __restrict__ bias = static_cast<const T*>(g.bias);
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= g.N) return;
  for (int64_t z = blockIdx.z; z < g.batch; z += gridDim.z) {
    const T* az = a + g.a_off[z];
    const T* bz = b + g.b_off[z];
    for (int64_t m = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; m < g.M; m += int64_t(gridDim.y) * blockDim.y) {
      float acc = 0.f;
      for (int64_t k = 0; k < g.K; ++k) acc += to_f(az[m * g.a_rs + k * g.a_cs]) * to_f(bz[k * g.b_rs + n * g.b_cs]);
      c[(z * g.M + m) * g.N + n] = from_f<T>(epilogue(acc, bias, n, g.relu));
    }
  }
}

// ---- float32: register-blocked shared-memory SGEMM -------------------------------------------------------
// 256 threads as a 16x16 grid; thread (ty, tx) owns rows {ty*4 + i, 64 + ty*4 + i} and columns
// {tx*4 + j, 64 + tx*4 + j} (i, j < 4): the split halves make each thread's shared-memory reads two
// float4s per operand per k, and a warp's reads conflict-free (broadcasts within each half).
constexpr int kSBM = 128, kSBN = 128, kSBK = 8, kSThreads = 256;

// Register use is high (about 250 on sm_90: the compiler hoists the shared-memory reads of all 8 k's), so one
// block per SM; a tuning candidate for a GPU session (cap at 128 registers without spilling).
__global__ void __launch_bounds__(kSThreads) sgemm_tiled(GemmArgs g) {
  const float* __restrict__ a = static_cast<const float*>(g.a);
  const float* __restrict__ b = static_cast<const float*>(g.b);
  float* __restrict__ c = static_cast<float*>(g.c);
  const float* __restrict__ bias = static_cast<const float*>(g.bias);
  __shared__ __align__(16) float As[2][kSBK][kSBM];  // A tile stored k-major: As[k][m]
  __shared__ __align__(16) float Bs[2][kSBK][kSBN];  // Bs[k][n]
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  // Load mapping: consecutive threads read consecutive addresses along whichever dimension has unit stride.
  const bool a_k_contig = g.a_cs == 1, b_n_contig = g.b_cs == 1 || g.b_rs != 1;
  const int64_t tiles_m = ceil_div(g.M, kSBM), tiles_n = ceil_div(g.N, kSBN);
  const int nk = int(ceil_div(g.K, kSBK));
  for (int64_t z = blockIdx.z; z < g.batch; z += gridDim.z) {
    const float* az = a + g.a_off[z];
    const float* bz = b + g.b_off[z];
    for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
      for (int64_t tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
        const int64_t m0 = tm * kSBM, n0 = tn * kSBN;
        float ra[4], rb[4];
        auto load = [&](int64_t k0) {  // global -> registers, zero outside the matrices
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int idx = t + kSThreads * i;
            const int kk = a_k_contig ? idx % kSBK : idx / kSBM, mm = a_k_contig ? idx / kSBK : idx % kSBM;
            const int64_t m = m0 + mm, k = k0 + kk;
            ra[i] = (m < g.M && k < g.K) ? az[m * g.a_rs + k * g.a_cs] : 0.f;
            const int kb = b_n_contig ? idx / kSBN : idx % kSBK, nn = b_n_contig ? idx % kSBN : idx / kSBK;
            const int64_t n = n0 + nn, k2 = k0 + kb;
            rb[i] = (n < g.N && k2 < g.K) ? bz[k2 * g.b_rs + n * g.b_cs] : 0.f;
          }
        };
        auto store = [&](int buf) {  // registers -> shared memory
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int idx = t + kSThreads * i;
            const int kk = a_k_contig ? idx % kSBK : idx / kSBM, mm = a_k_contig ? idx / kSBK : idx % kSBM;
            As[buf][kk][mm] = ra[i];
            const int kb = b_n_contig ? idx / kSBN : idx % kSBK, nn = b_n_contig ? idx % kSBN : idx / kSBK;
            Bs[buf][kb][nn] = rb[i];
          }
        };
        float acc[8][8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
        __syncthreads();  // the previous tile's last reads of buffer 0 are done
        load(0);
        store(0);
        __syncthreads();
        for (int kt = 0; kt < nk; ++kt) {
          const int cur = kt & 1;
          if (kt + 1 < nk) load(int64_t(kt + 1) * kSBK);  // prefetch overlaps the FMAs below
#pragma unroll
          for (int kk = 0; kk < kSBK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
          }
          // Writing the other buffer is safe: the barrier that ended step kt-1 saw everyone finish reading it.
          if (kt + 1 < nk) store(cur ^ 1);
          __syncthreads();
        }
        // Epilogue: rows/columns past the matrix edge are skipped; 32-bit offsets inside the tile.
        const int rows_left = int(g.M - m0 < kSBM ? g.M - m0 : kSBM), cols_left = int(g.N - n0 < kSBN ? g.N - n0 : kSBN);
        float* ct = c + (z * g.M + m0) * g.N + n0;
        const float* bt = bias ? bias + n0 : nullptr;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int r = i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4;
          if (r >= rows_left) continue;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int cc = j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4;
            if (cc < cols_left) ct[r * g.N + cc] = epilogue(acc[i][j], bt, cc, g.relu);
          }
        }
      }
    }
  }
}

// ---- float16: tensor cores through WMMA ------------------------------------------------------------------
// 8 warps as 2 (m) x 4 (n); warp (wm, wn) owns C rows wm*64 .. +63 and columns wn*32 .. +31: 4x2 fragments.
// Shared rows are padded by 8 halves (16 bytes) against bank conflicts; WMMA needs 32-byte aligned fragment
// pointers and leading dimensions that are multiples of 8 halves, which these paddings keep.
constexpr int kHBM = 128, kHBN = 128, kHBK = 32, kHThreads = 256;
constexpr int kHLdA = kHBK + 8, kHLdB = kHBN + 8;

__global__ void __launch_bounds__(kHThreads) hgemm_wmma(GemmArgs g, bool a_vec, bool b_vec) {
  using namespace nvcuda;
  const __half* __restrict__ a = static_cast<const __half*>(g.a);
  const __half* __restrict__ b = static_cast<const __half*>(g.b);
  __half* __restrict__ c = static_cast<__half*>(g.c);
  const __half* __restrict__ bias = static_cast<const __half*>(g.bias);
  __shared__ __align__(128) __half As[2][kHBM * kHLdA];  // As[m][k]
  __shared__ __align__(128) __half Bs[2][kHBK * kHLdB];  // Bs[k][n]
  __shared__ __align__(128) float scratch[kHThreads / 32][16 * 16];  // per-warp epilogue staging
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, wm = warp / 4, wn = warp % 4;
  const bool a_k_contig = g.a_cs == 1, b_n_contig = g.b_cs == 1 || g.b_rs != 1;
  const int64_t tiles_m = ceil_div(g.M, kHBM), tiles_n = ceil_div(g.N, kHBN);
  const int nk = int(ceil_div(g.K, kHBK));
  // Each thread moves 16 halves of A (128x32) and 16 of B (32x128) per k-step: two 16-byte vectors when
  // a_vec / b_vec (unit stride, K or N and the row stride multiples of 8, 16-byte aligned base: checked on
  // the host), else 16 scalar loads.
  for (int64_t z = blockIdx.z; z < g.batch; z += gridDim.z) {
    const __half* az = a + g.a_off[z];
    const __half* bz = b + g.b_off[z];
    for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
      for (int64_t tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
        const int64_t m0 = tm * kHBM, n0 = tn * kHBN;
        // The 16-byte path prefetches the next k-step into registers (rav, rbv) while the tensor cores work;
        // the strided path has no prefetch and copies global -> shared in store(), which keeps registers low.
        uint4 rav[2], rbv[2];
        const bool av = a_vec && g.a_off[z] % 8 == 0, bv = b_vec && g.b_off[z] % 8 == 0;
        auto load = [&](int64_t k0) {
          if (av) {  // row-major A: thread reads 8 consecutive k of one row, twice
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              const int idx = t + kHThreads * v, mm = idx / (kHBK / 8), kk = (idx % (kHBK / 8)) * 8;
              const int64_t m = m0 + mm, k = k0 + kk;
              rav[v] = (m < g.M && k < g.K) ? *reinterpret_cast<const uint4*>(az + m * g.a_rs + k) : make_uint4(0, 0, 0, 0);
            }
          }
          if (bv) {  // row-major B: 8 consecutive n of one k row, twice
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              const int idx = t + kHThreads * v, kk = idx / (kHBN / 8), nn = (idx % (kHBN / 8)) * 8;
              const int64_t n = n0 + nn, k = k0 + kk;
              rbv[v] = (n < g.N && k < g.K) ? *reinterpret_cast<const uint4*>(bz + k * g.b_rs + n) : make_uint4(0, 0, 0, 0);
            }
          }
        };
        auto store = [&](int buf, int64_t k0) {
          if (av) {
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              const int idx = t + kHThreads * v, mm = idx / (kHBK / 8), kk = (idx % (kHBK / 8)) * 8;
              *reinterpret_cast<uint4*>(&As[buf][mm * kHLdA + kk]) = rav[v];
            }
          } else {
            for (int i = 0; i < 16; ++i) {
              const int idx = t + kHThreads * i;
              const int kk = a_k_contig ? idx % kHBK : idx / kHBM, mm = a_k_contig ? idx / kHBK : idx % kHBM;
              const int64_t m = m0 + mm, k = k0 + kk;
              As[buf][mm * kHLdA + kk] = (m < g.M && k < g.K) ? az[m * g.a_rs + k * g.a_cs] : __float2half(0.f);
            }
          }
          if (bv) {
#pragma unroll
            for (int v = 0; v < 2; ++v) {
              const int idx = t + kHThreads * v, kk = idx / (kHBN / 8), nn = (idx % (kHBN / 8)) * 8;
              *reinterpret_cast<uint4*>(&Bs[buf][kk * kHLdB + nn]) = rbv[v];
            }
          } else {
            for (int i = 0; i < 16; ++i) {
              const int idx = t + kHThreads * i;
              const int kk = b_n_contig ? idx / kHBN : idx % kHBK, nn = b_n_contig ? idx % kHBN : idx / kHBK;
              const int64_t n = n0 + nn, k = k0 + kk;
              Bs[buf][kk * kHLdB + nn] = (n < g.N && k < g.K) ? bz[k * g.b_rs + n * g.b_cs] : __float2half(0.f);
            }
          }
        };
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
        __syncthreads();
        load(0);
        store(0, 0);
        __syncthreads();
        for (int kt = 0; kt < nk; ++kt) {
          const int cur = kt & 1;
          if (kt + 1 < nk) load(int64_t(kt + 1) * kHBK);
#pragma unroll
          for (int kk = 0; kk < kHBK; kk += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> bf[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], &Bs[cur][kk * kHLdB + wn * 32 + j * 16], kHLdB);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> af;
              wmma::load_matrix_sync(af, &As[cur][(wm * 64 + i * 16) * kHLdA + kk], kHLdA);
#pragma unroll
              for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af, bf[j], acc[i][j]);
            }
          }
          if (kt + 1 < nk) store(cur ^ 1, int64_t(kt + 1) * kHBK);
          __syncthreads();
        }
        // Epilogue through the warp's 16x16 staging tile: bias, relu, bounds, float -> half.
        float* st = scratch[warp];
        const int rows_left = int(g.M - m0 < kHBM ? g.M - m0 : kHBM), cols_left = int(g.N - n0 < kHBN ? g.N - n0 : kHBN);
        __half* ct = c + (z * g.M + m0) * g.N + n0;
        const __half* bt = bias ? bias + n0 : nullptr;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
#pragma unroll 1
            for (int e = 0; e < 8; ++e) {
              const int idx = lane + 32 * e, r = wm * 64 + i * 16 + idx / 16, cc = wn * 32 + j * 16 + idx % 16;
              if (r < rows_left && cc < cols_left) ct[int64_t(r) * g.N + cc] = __float2half_rn(epilogue(st[idx], bt, cc, g.relu));
            }
            __syncwarp();
          }
        }
      }
    }
  }
}

// ---- launcher ------------------------------------------------------------------------------------------
inline unsigned cap(int64_t x, int64_t limit) { return static_cast<unsigned>(x < 1 ? 1 : (x > limit ? limit : x)); }

void launch_gemm(int dtype, const GemmArgs& g, cudaStream_t s, int variant) {
  const unsigned gz = cap(g.batch, 65535);
  if (variant == 0) {
    const dim3 block(32, 8);
    const dim3 grid(cap(ceil_div(g.N, 32), 1 << 30), cap(ceil_div(g.M, 8), 65535), gz);
    if (dtype == kFloat32)
      gemm_plain<float><<<grid, block, 0, s>>>(g);
    else
      gemm_plain<__half><<<grid, block, 0, s>>>(g);
  } else if (dtype == kFloat32) {
    const dim3 grid(cap(ceil_div(g.N, kSBN), 1 << 30), cap(ceil_div(g.M, kSBM), 65535), gz);
    sgemm_tiled<<<grid, kSThreads, 0, s>>>(g);
  } else {
    // 16-byte vector loads need unit stride along the loaded dimension, a 16-byte aligned base, and every row
    // start a multiple of 8 halves from it (row stride here, each batch offset in the kernel).
    const bool a_vec = g.a_cs == 1 && g.K % 8 == 0 && g.a_rs % 8 == 0 && aligned16(uintptr_t(g.a));
    const bool b_vec = g.b_cs == 1 && g.N % 8 == 0 && g.b_rs % 8 == 0 && aligned16(uintptr_t(g.b));
    const dim3 grid(cap(ceil_div(g.N, kHBN), 1 << 30), cap(ceil_div(g.M, kHBM), 65535), gz);
    hgemm_wmma<<<grid, kHThreads, 0, s>>>(g, a_vec, b_vec);
  }
  FASTNN_CHECK_LAUNCH("matmul");
}

}  // namespace

void gemm(int device, int dtype, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t a_off, uintptr_t b_off,
          int64_t batch, int64_t M, int64_t N, int64_t K, int64_t a_rs, int64_t a_cs, int64_t b_rs, int64_t b_cs,
          uintptr_t bias, bool relu, uintptr_t stream, int variant) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  set_device("matmul", device);
  const GemmArgs g{reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), reinterpret_cast<void*>(c),
                   as_ptr<const int64_t>(a_off), as_ptr<const int64_t>(b_off), reinterpret_cast<const void*>(bias),
                   batch, M, N, K, a_rs, a_cs, b_rs, b_cs, relu};
  launch_gemm(dtype, g, as_stream(stream), variant);
}

}  // namespace fastnn::cuda
