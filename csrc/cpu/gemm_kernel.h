// The GEMM building blocks shared by matmul and attention: block sizes, packing of A and B panels and the
// register-tiled micro-kernel. ISA-specific only through simd.h's vector width and kMR; included by the
// per-ISA units, so each gets its own copy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <new>

#include <type_traits>

#include "cpu/half.h"
#include "cpu/simd.h"

namespace fastnn::cpu::FASTNN_ISA {

// Register tile: MR rows x NRV vectors. 2 * MR accumulators + NRV B vectors + 1 broadcast must fit the
// register file: 32 zmm (AVX-512: 8 x 2 = 16 acc), 16 ymm (AVX2: 6 x 2 = 12 acc), 16 xmm (generic: 4 x 2).
#if defined(FASTNN_ISA_avx512)
constexpr int kMR = 8;
#elif defined(FASTNN_ISA_avx2)
constexpr int kMR = 6;
#else
constexpr int kMR = 4;
#endif
constexpr int kNRV = 2;
// Cache blocking: a KC x NR panel of B (32 KiB for float/AVX-512) stays in L1 while an MC x KC block of A
// (MC = 24 * MR rows: about 200 KiB) stays in L2; a KC x NC block of B lives in L3. AVX2 takes longer K
// blocks for 4-byte elements (its float B panel is 24 KiB at 384): fewer passes over C, which large products
// read and write once per K block. 2048^3 float32 on a Zen 3 AVX2 host (32 KiB L1d, 512 KiB L2), fastnn
// alone, median GFLOP/s on 2 threads: 133-155 at 256, 143-175 at 384 (most runs 168-175), erratic at 512;
// `fastnn bench --isa avx2`: 0.82x -> 0.91x of OpenBLAS's rate; 1 thread: +1-3%. float64 keeps 256 (its A
// block would outgrow a 256 KiB L2).
#if defined(FASTNN_ISA_avx2)
template <typename T> constexpr int64_t kKC = sizeof(T) == 4 ? 384 : 256;
#else
template <typename T> constexpr int64_t kKC = 256;
#endif
constexpr int64_t kMC = 24 * kMR;
constexpr int64_t kNC = 2048;

template <typename T> constexpr int64_t kNR = kNRV * kLanes<T>;

struct AlignedBuffer {
  void* p = nullptr;
  explicit AlignedBuffer(size_t bytes) : p(bytes ? ::operator new(bytes, std::align_val_t(64)) : nullptr) {}
  ~AlignedBuffer() {
    if (p) ::operator delete(p, std::align_val_t(64));
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Ap: panels of kMR rows; element (r, k) of a panel at [k * kMR + r]. Rows past M are zero. S, the element
// read, may be a 16-bit storage type (Bf16, F16): widened to T (float) while packing.
template <typename T, typename S>
inline void pack_a_panel(const S* A, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, T* dst) {
  if (rows == kMR && a_rs == 1) {  // columns of A contiguous: copy kMR at a time
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < kMR; ++r) dst[k * kMR + r] = T(widen1(A[k * a_cs + r]));
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const S* src = A + r * a_rs;
    for (int64_t k = 0; k < kc; ++k) dst[k * kMR + r] = T(widen1(src[k * a_cs]));
  }
  for (int64_t r = rows; r < kMR; ++r)
    for (int64_t k = 0; k < kc; ++k) dst[k * kMR + r] = T(0);
}

// Bp: panels of NR columns; element (k, c) of a panel at [k * NR + c]. Columns past N are zero.
// NRV (vectors per panel row) is kNRV, or 1 for narrow products where a 2-vector panel would be mostly padding.
template <typename T, int NRV = kNRV, typename S = T>
inline void pack_b_panel(const S* B, int64_t b_rs, int64_t b_cs, int64_t kc, int64_t cols, T* dst) {
  constexpr int64_t NR = NRV * kLanes<T>;
  if constexpr (!std::is_same_v<S, T>) {  // 16-bit elements, widened (rows contiguous or not)
    for (int64_t k = 0; k < kc; ++k) {
      const S* src = B + k * b_rs;
      T* d = dst + k * NR;
      if (b_cs == 1) {
        for (int64_t c = 0; c < cols; ++c) d[c] = widen1(src[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = widen1(src[c * b_cs]);
      }
      for (int64_t c = cols; c < NR; ++c) d[c] = T(0);
    }
    return;
  } else {
  if (cols == NR && b_cs == 1) {
    for (int64_t k = 0; k < kc; ++k)
      for (int v = 0; v < NRV; ++v)
        vstore(dst + k * NR + v * kLanes<T>, vload(B + k * b_rs + v * kLanes<T>));
    return;
  }
  if (b_cs == 1) {  // a partial panel of contiguous rows: partial vector loads, zero-filled
    for (int64_t k = 0; k < kc; ++k)
      for (int v = 0; v < NRV; ++v) {
        const int64_t n = std::clamp<int64_t>(cols - v * kLanes<T>, 0, kLanes<T>);
        vstore(dst + k * NR + v * kLanes<T>, vload_part(B + k * b_rs + v * kLanes<T>, n, T(0)));
      }
    return;
  }
  for (int64_t k = 0; k < kc; ++k) {
    const T* src = B + k * b_rs;
    T* d = dst + k * NR;
    for (int64_t c = 0; c < cols; ++c) d[c] = src[c * b_cs];
    for (int64_t c = cols; c < NR; ++c) d[c] = T(0);
  }
  }
}

// The micro-kernels' epilogue: C tile (=|+=) acc, + bias, relu; rows past mr skipped, columns past nr
// masked off (partial loads and stores). The caller pads bias to whole panels.
template <typename T, int NRV>
FASTNN_INLINE void store_tile(const Vec<T> (&acc)[kMR][NRV], T* c, int64_t ldc, int64_t mr, int64_t nr,
                              bool accumulate, const T* bias, bool relu) {
  constexpr int64_t W = kLanes<T>, NR = NRV * W;
  if (mr == kMR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) {
        T* p = c + i * ldc + v * W;
        Vec<T> r = acc[i][v];
        if (accumulate) r += vload(p);
        if (bias) r += vload(bias + v * W);
        if (relu) r = vrelu(r);
        vstore(p, r);
      }
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i) {
    if (i >= mr) break;
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) {
      const int64_t n = std::clamp<int64_t>(nr - v * W, 0, W);
      T* p = c + i * ldc + v * W;
      Vec<T> r = acc[i][v];
      if (accumulate) r += vload_part(p, n, T(0));
      if (bias) r += vload(bias + v * W);
      if (relu) r = vrelu(r);
      vstore_part(p, r, n);
    }
  }
}


// C[0:mr, 0:nr] (=|+=) A_panel * B_panel over kc; then, on the last K block, + bias and relu.
// A panel element (r, k) is at a[r * a_rs + k * a_cs]: a packed panel has (a_rs, a_cs) = (1, kMR); a
// row-major A can also be read in place with (lda, 1), which saves packing small products. B panel row k
// (NR contiguous elements) is at b + k * b_rs: b_rs = NR for a packed panel, or a row-major B's row
// stride to read it in place (all NR columns must exist).
template <typename T, int NRV = kNRV>
inline void micro_kernel(int64_t kc, const T* FASTNN_RESTRICT a, int64_t a_rs, int64_t a_cs,
                         const T* FASTNN_RESTRICT b, int64_t b_rs, T* c, int64_t ldc, int64_t mr, int64_t nr,
                         bool accumulate, const T* bias, bool relu) {
  constexpr int64_t W = kLanes<T>, NR = NRV * W;
  // The C tile is read (accumulate) or written at the end: fetch its lines now, while the K loop runs.
  for (int64_t i = 0; i < mr; ++i)
    for (int v = 0; v < NRV; ++v) __builtin_prefetch(c + i * ldc + v * W, 1);
  Vec<T> acc[kMR][NRV];
#pragma GCC unroll 16
  for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) acc[i][v] = Vec<T>{};
  for (int64_t k = 0; k < kc; ++k) {
    Vec<T> bv[NRV];
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) bv[v] = vload(b + k * b_rs + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < kMR; ++i) {
      const Vec<T> av = vset<T>(a[i * a_rs + k * a_cs]);
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) acc[i][v] += av * bv[v];
    }
  }
  store_tile<T, NRV>(acc, c, ldc, mr, nr, accumulate, bias, relu);
}

// Whole-operand helpers for small in-cache products (attention tiles): pack every row panel of a
// rows x kc operand A, every column panel of a kc x cols operand B, and run all micro-tiles of C.
template <typename T>
inline void pack_a(const T* A, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, T* dst) {
  for (int64_t ip = 0; ip * kMR < rows; ++ip)
    pack_a_panel(A + ip * kMR * a_rs, a_rs, a_cs, std::min<int64_t>(kMR, rows - ip * kMR), kc, dst + ip * kMR * kc);
}

template <typename T>
inline void pack_b(const T* B, int64_t b_rs, int64_t b_cs, int64_t kc, int64_t cols, T* dst) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t jp = 0; jp * NR < cols; ++jp)
    pack_b_panel(B + jp * NR * b_cs, b_rs, b_cs, kc, std::min(NR, cols - jp * NR), dst + jp * NR * kc);
}

// C[rows x cols] (=|+=) Ap * Bp over kc, both packed by pack_a / pack_b.
template <typename T>
inline void gemm_packed(const T* Ap, const T* Bp, int64_t rows, int64_t cols, int64_t kc, T* C, int64_t ldc,
                        bool accumulate) {
  constexpr int64_t NR = kNR<T>;
  for (int64_t jp = 0; jp * NR < cols; ++jp)
    for (int64_t ip = 0; ip * kMR < rows; ++ip)
      micro_kernel<T>(kc, Ap + ip * kMR * kc, 1, kMR, Bp + jp * NR * kc, NR, C + ip * kMR * ldc + jp * NR, ldc,
                      std::min<int64_t>(kMR, rows - ip * kMR), std::min(NR, cols - jp * NR), accumulate, nullptr,
                      false);
}

}  // namespace fastnn::cpu::FASTNN_ISA
