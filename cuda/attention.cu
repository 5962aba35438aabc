// Scaled dot-product attention forward: out = softmax(q k^T * scale + mask) v, with bool or additive masks,
// top-left causal masking and grouped-query heads (through the per-batch offset arrays built in Python).
//   sdpa_plain  one block per query row, one thread per output column; every thread recomputes the row's
//               scores (three passes: max, sum, weighted sum). The reference.
//   sdpa_flash  FlashAttention-2 style: a block owns BM query rows and walks the keys in tiles of BN with an
//               online softmax (running max m and sum l per row, O rescaled by exp(m_old - m_new)); no L x S
//               matrix exists. float16: both products on tensor cores (WMMA, float accumulation, P rounded
//               to half as in FlashAttention); float32: scalar FMAs from shared memory.
// The flash kernel keeps O, S and the tiles in dynamic shared memory; when a head dimension needs more than
// this device offers per block, the launcher falls back to the plain kernel (slow but correct).
// Dropout: the probabilities are dropped after the softmax sum takes them (the sum is the softmax's), with
// the bits of fastnn/_dropout.py and the CPU kernel: Philox4x32-10, counter (j / 4, i, z, offset), key
// (seed low, seed high), word j % 4, kept when >= drop_threshold; the output is scaled by keep_scale.
#include <mma.h>

#include "common.cuh"
#include "ops.h"

namespace fastnn::cuda {
namespace {

struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int64_t* q_off;
  const int64_t* k_off;
  const int64_t* v_off;
  int64_t nbatch, L, S, E, Ev, q_rs, k_rs, v_rs;
  const void* mask;
  int mask_kind;  // 0 none, 1 bool (uint8), 2 additive (dtype T)
  const int64_t* m_off;
  int64_t m_rs, m_cs;
  bool causal;
  float scale;
  float* lse;  // float32 for every dtype (as FlashAttention): a float16 lse would shift whole rows of P
  bool dropout;
  uint32_t drop_threshold, offset;
  uint64_t seed;
  float keep_scale;
};

// ---- dropout ---------------------------------------------------------------------------------------------
// Not inlined: inlined into the float16 flash kernel it made ptxas spill registers (sm_80); it runs once per
// 4 keys of a row, so the call costs nothing that matters.
__device__ __noinline__ uint4 philox4x32_10(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Keep bits of keys 4g .. 4g + 3 (bit u for key 4g + u) of query i of batch z.
__device__ __forceinline__ uint32_t dropout_keep4(const AttnArgs& a, int64_t z, int64_t i, int64_t g) {
  const uint4 x = philox4x32_10(make_uint4(uint32_t(g), uint32_t(i), uint32_t(z), a.offset), uint32_t(a.seed),
                                uint32_t(a.seed >> 32));
  return uint32_t(x.x >= a.drop_threshold) | uint32_t(x.y >= a.drop_threshold) << 1 |
         uint32_t(x.z >= a.drop_threshold) << 2 | uint32_t(x.w >= a.drop_threshold) << 3;
}

// The scaled, masked score of query i and key j of batch z. A key that is not allowed gets -inf added, as
// PyTorch's additive mask does: -inf, or NaN where the score itself is NaN or +inf.
template <typename T>
__device__ __forceinline__ float masked_score(const AttnArgs& a, int64_t z, int64_t i, int64_t j, float dot) {
  float s = dot * a.scale;
  if (a.causal && j > i) return s - INFINITY;
  if (a.mask_kind != 0) {
    const int64_t o = a.m_off[z] + i * a.m_rs + j * a.m_cs;
    if (a.mask_kind == 1) {
      if (!static_cast<const uint8_t*>(a.mask)[o]) return s - INFINITY;
    } else {
      s += to_f(static_cast<const T*>(a.mask)[o]);
    }
  }
  return s;
}

// ---- plain -------------------------------------------------------------------------------------------------
template <typename T> __global__ void sdpa_plain(AttnArgs a) {
  const T* __restrict__ qp = static_cast<const T*>(a.q);
  const T* __restrict__ kp = static_cast<const T*>(a.k);
  const T* __restrict__ vp = static_cast<const T*>(a.v);
  for (int64_t row = blockIdx.x; row < a.nbatch * a.L; row += gridDim.x) {
    const int64_t z = row / a.L, i = row % a.L;
    const T* q = qp + a.q_off[z] + i * a.q_rs;
    auto score = [&](int64_t j) {
      const T* k = kp + a.k_off[z] + j * a.k_rs;
      float dot = 0.f;
      for (int64_t e = 0; e < a.E; ++e) dot += to_f(q[e]) * to_f(k[e]);
      return masked_score<T>(a, z, i, j, dot);
    };
    float m = -INFINITY;
    for (int64_t j = 0; j < a.S; ++j) m = fmaxf(m, score(j));
    float l = 0.f;  // l == 0: no allowed key (zeros); NaN when a score is NaN (see sdpa_flash's store)
    for (int64_t j = 0; j < a.S; ++j) l += exp_diff(score(j), m);
    for (int64_t d = threadIdx.x; d < a.Ev; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < a.S; ++j) {
        if (a.dropout && !((dropout_keep4(a, z, i, j >> 2) >> (j & 3)) & 1)) continue;
        acc += exp_diff(score(j), m) * to_f(vp[a.v_off[z] + j * a.v_rs + d]);
      }
      static_cast<T*>(a.out)[row * a.Ev + d] =
          from_f<T>(l == 0.f ? 0.f : a.dropout ? acc / l * a.keep_scale : acc / l);
    }
    if (a.lse && threadIdx.x == 0) a.lse[row] = l == 0.f ? -INFINITY : m + logf(l);
  }
}

// ---- flash ---------------------------------------------------------------------------------------------------
constexpr int kBN = 64;       // keys per tile
constexpr int kWarps = 4;     // 128 threads
template <typename T> struct FlashCfg;
template <> struct FlashCfg<__half> { static constexpr int BM = 64; };  // 16 query rows per warp (one WMMA row)
template <> struct FlashCfg<float> { static constexpr int BM = 32; };   // 8 rows per warp; fits 99 KB at E=128

// Shared-memory layout, computed on the host (leading dimensions in elements, offsets in bytes).
struct FlashLayout {
  int ep, evp;                 // head dims as stored in shared memory (float16: rounded up to 16, zero padded)
  int ldq, ldkv, lds, ldp, ldo;
  int off_q, off_kv, off_s, off_p, off_o, off_m, off_l;
  int bytes;
};

inline int align128(int x) { return (x + 127) / 128 * 128; }

template <typename T> FlashLayout flash_layout(int64_t E, int64_t Ev) {
  constexpr int BM = FlashCfg<T>::BM;
  FlashLayout f{};
  const bool half = sizeof(T) == 2;
  // float16: WMMA wants leading dims that are multiples of 8 halves / 4 floats and 32-byte aligned fragments;
  // the +8 / +4 paddings keep both and spread rows across banks. float32: odd leading dims avoid conflicts.
  f.ep = half ? int((E + 15) / 16 * 16) : int(E);
  f.evp = half ? int((Ev + 15) / 16 * 16) : int(Ev);
  const int kvw = f.ep > f.evp ? f.ep : f.evp;
  f.ldq = half ? f.ep + 8 : (f.ep | 1);
  f.ldkv = half ? kvw + 8 : (kvw | 1);
  f.lds = kBN + 4;
  f.ldp = kBN + 8;
  f.ldo = half ? f.evp + 4 : (f.evp | 1);
  int o = 0;
  f.off_q = o;  o = align128(o + BM * f.ldq * int(sizeof(T)));
  f.off_kv = o; o = align128(o + kBN * f.ldkv * int(sizeof(T)));
  f.off_s = o;  o = align128(o + BM * f.lds * 4);
  f.off_p = o;  o = align128(o + (half ? BM * f.ldp * 2 : 0));
  f.off_o = o;  o = align128(o + BM * f.ldo * 4);
  f.off_m = o;  o = align128(o + BM * 4);
  f.off_l = o;  o = align128(o + BM * 4);
  f.bytes = o;
  return f;
}

// dst[r][c] (leading dim ld) = src[r * rs + c] for r < rows_valid and c < cols_valid, else 0; r < rows,
// c < cols. `vec`: 16-byte moves (cols and cols_valid multiples of 8 halves, src row starts 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t rs,
                                          int64_t rows_valid, int cols_valid, int rows, int cols, bool vec) {
  if (sizeof(T) == 2 && vec) {
    const int per_row = cols / 8;
    for (int idx = threadIdx.x; idx < rows * per_row; idx += blockDim.x) {
      const int r = idx / per_row, c = (idx % per_row) * 8;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < rows_valid && c < cols_valid) val = *reinterpret_cast<const uint4*>(src + r * rs + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
      const int r = idx / cols, c = idx % cols;
      dst[r * ld + c] = (r < rows_valid && c < cols_valid) ? src[r * rs + c] : from_f<T>(0.f);
    }
  }
}

// S[r][j] = sum_e Q[r][e] K[j][e] for the BM x BN tile.
__device__ __forceinline__ void tile_qk(const __half* Qs, const __half* Ks, float* Ss, const FlashLayout& f) {
  using namespace nvcuda;
  const int w = threadIdx.x / 32;
#pragma unroll
  for (int cb = 0; cb < kBN / 16; ++cb) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < f.ep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> qa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> kb;  // K^T: element (e, j) at K[j][e]
      wmma::load_matrix_sync(qa, Qs + w * 16 * f.ldq + kk, f.ldq);
      wmma::load_matrix_sync(kb, Ks + cb * 16 * f.ldkv + kk, f.ldkv);
      wmma::mma_sync(acc, qa, kb, acc);
    }
    wmma::store_matrix_sync(Ss + w * 16 * f.lds + cb * 16, acc, f.lds, wmma::mem_row_major);
  }
}
__device__ __forceinline__ void tile_qk(const float* Qs, const float* Ks, float* Ss, const FlashLayout& f) {
  constexpr int BM = FlashCfg<float>::BM;
  for (int idx = threadIdx.x; idx < BM * kBN; idx += blockDim.x) {
    const int r = idx / kBN, j = idx % kBN;
    float dot = 0.f;
    for (int e = 0; e < f.ep; ++e) dot = fmaf(Qs[r * f.ldq + e], Ks[j * f.ldkv + e], dot);
    Ss[r * f.lds + j] = dot;
  }
}

// O[r][d] += sum_j P[r][j] V[j][d]. float16: warp w owns rows w*16..+15 (the rows it also ran softmax on).
__device__ __forceinline__ void tile_pv(const __half* Ps, const float*, const __half* Vs, float* Os, const FlashLayout& f) {
  using namespace nvcuda;
  const int w = threadIdx.x / 32;
  for (int db = 0; db < f.evp; db += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, Os + w * 16 * f.ldo + db, f.ldo, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < kBN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> pa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> vb;
      wmma::load_matrix_sync(pa, Ps + w * 16 * f.ldp + kk, f.ldp);
      wmma::load_matrix_sync(vb, Vs + kk * f.ldkv + db, f.ldkv);
      wmma::mma_sync(acc, pa, vb, acc);
    }
    wmma::store_matrix_sync(Os + w * 16 * f.ldo + db, acc, f.ldo, wmma::mem_row_major);
  }
}
__device__ __forceinline__ void tile_pv(const __half*, const float* Ss, const float* Vs, float* Os, const FlashLayout& f) {
  constexpr int BM = FlashCfg<float>::BM;
  for (int idx = threadIdx.x; idx < BM * f.evp; idx += blockDim.x) {
    const int r = idx / f.evp, d = idx % f.evp;
    float acc = Os[r * f.ldo + d];
    for (int j = 0; j < kBN; ++j) acc = fmaf(Ss[r * f.lds + j], Vs[j * f.ldkv + d], acc);
    Os[r * f.ldo + d] = acc;
  }
}

template <typename T> __global__ void __launch_bounds__(kWarps * 32) sdpa_flash(AttnArgs a, FlashLayout f, bool vec) {
  constexpr int BM = FlashCfg<T>::BM, kRowsPerWarp = BM / kWarps;
  constexpr bool kHalf = sizeof(T) == 2;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + f.off_q);
  T* KVs = reinterpret_cast<T*>(smem + f.off_kv);
  float* Ss = reinterpret_cast<float*>(smem + f.off_s);
  __half* Ps = reinterpret_cast<__half*>(smem + f.off_p);  // float16 only (float32 keeps P in Ss)
  float* Os = reinterpret_cast<float*>(smem + f.off_o);
  float* row_m = reinterpret_cast<float*>(smem + f.off_m);
  float* row_l = reinterpret_cast<float*>(smem + f.off_l);
  const T* qp = static_cast<const T*>(a.q);
  const T* kp = static_cast<const T*>(a.k);
  const T* vp = static_cast<const T*>(a.v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nq = ceil_div(a.L, BM);
  for (int64_t bid = blockIdx.x; bid < a.nbatch * nq; bid += gridDim.x) {
    const int64_t z = bid / nq, q0 = (nq - 1 - bid % nq) * BM;  // long causal tiles first
    const bool vq = vec && a.q_off[z] % 8 == 0, vk = vec && a.k_off[z] % 8 == 0, vv = vec && a.v_off[z] % 8 == 0;
    __syncthreads();  // the previous tile's readers of shared memory are done
    load_tile<T>(Qs, f.ldq, qp + a.q_off[z] + q0 * a.q_rs, a.q_rs, a.L - q0, int(a.E), BM, f.ep, vq);
    for (int idx = threadIdx.x; idx < BM * f.evp; idx += blockDim.x) Os[(idx / f.evp) * f.ldo + idx % f.evp] = 0.f;
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      row_m[r] = -INFINITY;
      row_l[r] = 0.f;
    }
    // Keys beyond the last query row of the tile are all masked when causal: skip their tiles.
    const int64_t q_last = (q0 + BM < a.L ? q0 + BM : a.L) - 1;
    const int64_t s_end = a.causal ? (q_last + 1 < a.S ? q_last + 1 : a.S) : a.S;
    for (int64_t k0 = 0; k0 < s_end; k0 += kBN) {
      __syncthreads();  // previous P V done with KVs
      load_tile<T>(KVs, f.ldkv, kp + a.k_off[z] + k0 * a.k_rs, a.k_rs, a.S - k0, int(a.E), kBN, f.ep, vk);
      __syncthreads();
      tile_qk(Qs, KVs, Ss, f);
      __syncthreads();
      // Online softmax: warp `warp` updates rows warp*kRowsPerWarp.., lanes over the tile's keys.
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t i = q0 + r;
        float s[kBN / 32];
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < kBN / 32; ++c) {
          const int j = lane + 32 * c;
          s[c] = (i < a.L && k0 + j < a.S) ? masked_score<T>(a, z, i, k0 + j, Ss[r * f.lds + j]) : -INFINITY;
          mx = fmaxf(mx, s[c]);
        }
        mx = warp_max(mx);
        const float m_old = row_m[r], m_new = fmaxf(m_old, mx);
        const float alpha = exp_diff(m_old, m_new);
        // Dropout: lane g < kBN / 4 draws the keep bits of keys 4g .. 4g + 3; key j reads them from lane j / 4.
        uint32_t keep4 = 0xF;
        if (a.dropout && lane < kBN / 4 && i < a.L) keep4 = dropout_keep4(a, z, i, k0 / 4 + lane);
        float psum = 0.f;
#pragma unroll
        for (int c = 0; c < kBN / 32; ++c) {
          const int j = lane + 32 * c;
          float p = exp_diff(s[c], m_new);
          psum += p;
          if (a.dropout && !((__shfl_sync(0xffffffffu, keep4, j / 4) >> (j % 4)) & 1)) p = 0.f;
          if (kHalf) Ps[r * f.ldp + j] = __float2half_rn(p);
          else Ss[r * f.lds + j] = p;
        }
        psum = warp_sum(psum);
        for (int d = lane; d < f.evp; d += 32) Os[r * f.ldo + d] *= alpha;
        __syncwarp();
        if (lane == 0) {
          row_m[r] = m_new;
          row_l[r] = row_l[r] * alpha + psum;
        }
      }
      __syncthreads();  // S fully read before V overwrites K in KVs
      load_tile<T>(KVs, f.ldkv, vp + a.v_off[z] + k0 * a.v_rs, a.v_rs, a.S - k0, int(a.Ev), kBN, f.evp, vv);
      __syncthreads();
      tile_pv(Ps, Ss, KVs, Os, f);
    }
    __syncthreads();
    // A row with no allowed key has l == 0: zeros and lse -inf. The sum decides, not the max: a NaN score is
    // dropped by fmaxf (a row whose allowed scores are all NaN keeps m == -inf) but makes l NaN, so the row
    // and its lse come out NaN, as on the CPU and in the oracle.
    T* out = static_cast<T*>(a.out) + (z * a.L + q0) * a.Ev;
    for (int idx = threadIdx.x; idx < BM * a.Ev; idx += blockDim.x) {
      const int r = int(idx / a.Ev), d = int(idx % a.Ev);
      if (q0 + r >= a.L) break;  // idx grows with r: every later idx is past the last row too
      const float o = Os[r * f.ldo + d] / row_l[r];
      out[idx] = from_f<T>(row_l[r] == 0.f ? 0.f : a.dropout ? o * a.keep_scale : o);
    }
    if (a.lse)
      for (int r = threadIdx.x; r < BM && q0 + r < a.L; r += blockDim.x)
        a.lse[z * a.L + q0 + r] = row_l[r] == 0.f ? -INFINITY : row_m[r] + logf(row_l[r]);
  }
}

// ---- launcher ------------------------------------------------------------------------------------------------
template <typename T> void launch_sdpa(const AttnArgs& a, int device, cudaStream_t s, int variant) {
  const int64_t rows = a.nbatch * a.L;
  FlashLayout f = flash_layout<T>(a.E, a.Ev);
  int smem_max = 0;
  FASTNN_CUDA_CHECK("scaled_dot_product_attention",
                    cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (variant == 0 || f.bytes > smem_max) {
    sdpa_plain<T><<<grid_for(rows, 1), 128, 0, s>>>(a);
  } else {
    if (f.bytes > 48 * 1024)
      FASTNN_CUDA_CHECK("scaled_dot_product_attention",
                        cudaFuncSetAttribute(sdpa_flash<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, f.bytes));
    // 16-byte tile loads: float16, head dims multiples of 8, row strides multiples of 8, 16-byte aligned bases
    // (each batch offset is checked in the kernel).
    const bool vec = sizeof(T) == 2 && a.E % 8 == 0 && a.Ev % 8 == 0 && a.q_rs % 8 == 0 && a.k_rs % 8 == 0 &&
                     a.v_rs % 8 == 0 && aligned16(uintptr_t(a.q)) && aligned16(uintptr_t(a.k)) &&
                     aligned16(uintptr_t(a.v));
    const int64_t tiles = a.nbatch * ceil_div(a.L, FlashCfg<T>::BM);
    sdpa_flash<T><<<grid_for(tiles, 1), kWarps * 32, f.bytes, s>>>(a, f, vec);
  }
  FASTNN_CHECK_LAUNCH("scaled_dot_product_attention");
}

}  // namespace

void sdpa(int device, int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t q_off,
          uintptr_t k_off, uintptr_t v_off, int64_t nbatch, int64_t L, int64_t S, int64_t E, int64_t Ev,
          int64_t q_rs, int64_t k_rs, int64_t v_rs, uintptr_t mask, int mask_kind, uintptr_t m_off, int64_t m_rs,
          int64_t m_cs, bool causal, float scale, uintptr_t lse, uintptr_t stream, int variant, bool dropout,
          uint32_t drop_threshold, float keep_scale, uint64_t seed, uint32_t offset) {
  if (nbatch <= 0 || L <= 0) return;
  set_device("scaled_dot_product_attention", device);
  const AttnArgs a{reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k), reinterpret_cast<const void*>(v),
                   reinterpret_cast<void*>(out), as_ptr<const int64_t>(q_off), as_ptr<const int64_t>(k_off),
                   as_ptr<const int64_t>(v_off), nbatch, L, S, E, Ev, q_rs, k_rs, v_rs,
                   reinterpret_cast<const void*>(mask), mask_kind, as_ptr<const int64_t>(m_off), m_rs, m_cs, causal,
                   scale, reinterpret_cast<float*>(lse), dropout, drop_threshold, offset, seed, keep_scale};
  if (dtype == kFloat32)
    launch_sdpa<float>(a, device, as_stream(stream), variant);
  else
    launch_sdpa<__half>(a, device, as_stream(stream), variant);
}

}  // namespace fastnn::cuda
