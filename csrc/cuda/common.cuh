// Device helpers shared by the CUDA kernels: element types per tag, 8-element vector
// loads/stores that widen to float32 in registers, fp8 quantization, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "cuda/kernels.h"
#include "cuda/launch.cuh"

namespace pagedkv::cuda {

// Device element type of each tag (fp8 caches are raw bytes).
template <typename Tag> struct Elem;
template <> struct Elem<F32> { using type = float; };
template <> struct Elem<F16> { using type = __half; };
template <> struct Elem<BF16> { using type = __nv_bfloat16; };
template <> struct Elem<E4M3> { using type = uint8_t; };
template <> struct Elem<E5M2> { using type = uint8_t; };

template <typename Tag> constexpr bool kIsFp8 = false;
template <> constexpr bool kIsFp8<E4M3> = true;
template <> constexpr bool kIsFp8<E5M2> = true;

template <typename Tag> constexpr __nv_fp8_interpretation_t kFp8Kind = __NV_E4M3;
template <> constexpr __nv_fp8_interpretation_t kFp8Kind<E5M2> = __NV_E5M2;

// Largest finite value of each fp8 format (saturation bound).
template <typename Tag> constexpr float kFp8Max = 448.f;
template <> constexpr float kFp8Max<E5M2> = 57344.f;

constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// fp32 -> fp8 byte: round_to_fp8(x / scale) saturated to the finite range, NaN stored as
// 0 (docs/design.md §2: an fp8 cache never holds inf or NaN). A true division, not a multiply by
// the reciprocal, so the stored bytes equal torch_pagedkv.reference.quantize exactly.
template <typename Tag>
__device__ __forceinline__ uint8_t quantize_fp8(float x, float scale) {
  float y = x / scale;
  y = isnan(y) ? 0.f : fminf(fmaxf(y, -kFp8Max<Tag>), kFp8Max<Tag>);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, kFp8Kind<Tag>));
}

// 8 consecutive elements <-> 8 floats. Pointers must be aligned to 8 elements
// (16 bytes for 16-bit types, 32 for float, 8 for fp8); the glue checks the bases.
template <typename Tag> struct Vec8;

template <> struct Vec8<F32> {
  using T = float;
  static __device__ __forceinline__ void load(const T* p, float (&f)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
  }
};

template <> struct Vec8<F16> {
  using T = __half;
  static __device__ __forceinline__ void load(const T* p, float (&f)[8]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 x = __half22float2(h);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      memcpy(&w[i], &h, 4);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <> struct Vec8<BF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ void load(const T* p, float (&f)[8]) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    // bf16 is the top half of a float32: widening is a shift.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      memcpy(&w[i], &h, 4);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <typename Tag> struct Vec8Fp8 {
  using T = uint8_t;
  static __device__ __forceinline__ void load(const T* p, float (&f)[8]) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const __nv_fp8x2_storage_t pair =
            static_cast<__nv_fp8x2_storage_t>((w[i] >> (16 * j)) & 0xffffu);
        const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, kFp8Kind<Tag>);
        __half2 h;
        memcpy(&h, &hr, 4);
        const float2 x = __half22float2(h);
        f[4 * i + 2 * j] = x.x;
        f[4 * i + 2 * j + 1] = x.y;
      }
    }
  }
};
template <> struct Vec8<E4M3> : Vec8Fp8<E4M3> {};
template <> struct Vec8<E5M2> : Vec8Fp8<E5M2> {};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Physical block of key position k of a sequence, or -1 when the table entry is out of
// range [0, num_blocks) (the key is then skipped, never read). block_shift >= 0 when the
// block size is a power of two (every specialized size is), else -1 and we divide.
struct BlockLookup {
  const int32_t* row;  // this sequence's block-table row
  int block_size, block_shift, num_blocks;

  __device__ __forceinline__ int64_t slot(int k) const {  // cache row index, or -1
    const int b = block_shift >= 0 ? (k >> block_shift) : k / block_size;
    const int off = block_shift >= 0 ? (k & (block_size - 1)) : k - b * block_size;
    const int blk = __ldg(row + b);
    return (blk >= 0 && blk < num_blocks) ? int64_t(blk) * block_size + off : -1;
  }
};

__host__ __device__ inline int log2_if_pow2(int x) {
  if (x <= 0 || (x & (x - 1)) != 0) return -1;
  int s = 0;
  while ((1 << s) < x) ++s;
  return s;
}

// Where query row t lies: its sequence, position and visible keys [k_lo, k_hi) (all of
// the sequence's keys when p.causal is false). Found on the device from query_start_loc,
// so no host ever reads the metadata. A row with no visible key, or malformed metadata,
// yields valid = false (the row then gets zeros and lse -inf), never an out-of-range read.
struct RowInfo {
  int seq;
  int64_t pos;
  int k_lo, k_hi;
  bool valid;
};

// Largest i in [0, num_seqs) with qsl[i] <= x (0 if none); qsl needs num_seqs + 1 entries.
__device__ __forceinline__ int find_seq(const int32_t* qsl, int num_seqs, int64_t x) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(qsl + mid) <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ RowInfo locate_row(const AttentionParams& p, int t) {
  RowInfo r{0, 0, 0, 0, false};
  if (p.num_seqs <= 0) return r;
  const int i = find_seq(p.query_start_loc, p.num_seqs, t);
  const int64_t q0 = __ldg(p.query_start_loc + i), q1 = __ldg(p.query_start_loc + i + 1);
  if (!(q0 <= t && t < q1)) return r;
  const int64_t max_ctx = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t seq_len = __ldg(p.seq_lens + i);
  const int64_t pos = seq_len - (q1 - q0) + (t - q0);
  // Keys up to the row's position, or (causal=False) the whole sequence.
  const int64_t end = p.causal ? pos + 1 : seq_len;
  const int64_t hi = end < max_ctx ? end : max_ctx;  // never past the table
  const int64_t lo = p.causal && p.sliding_window > 0 ? (pos - p.sliding_window + 1 > 0 ? pos - p.sliding_window + 1 : 0) : 0;
  r.seq = i;
  r.pos = pos;
  r.k_lo = int(lo < hi ? lo : 0);
  r.k_hi = int(hi > 0 ? hi : 0);
  r.valid = lo < hi;
  return r;
}

// The query row a decode CTA row serves: grid x is the row itself, or (mixed batches,
// p.single_rows_to_decode) a sequence, served only when it has exactly one query row;
// -1 when the prefill kernel serves it (or the metadata is malformed).
__device__ __forceinline__ int decode_row_of(const AttentionParams& p, int x) {
  if (!p.single_rows_to_decode) return x;
  const int q0 = __ldg(p.query_start_loc + x), q1 = __ldg(p.query_start_loc + x + 1);
  return q1 - q0 == 1 && q0 >= 0 && q0 < p.num_q_tokens ? q0 : -1;
}

// Post-processing of a raw score (already multiplied by scale): softcap, then ALiBi.
__device__ __forceinline__ float finish_score(float s, float softcap, float slope, int64_t k,
                                              int64_t pos) {
  if (softcap > 0.f) s = softcap * tanhf(s / softcap);
  return s + slope * float(k - pos);
}

__device__ __forceinline__ float load_scale(const float* s) { return s ? __ldg(s) : 1.f; }

// log-sum-exp of a softmax with maximum m and sum l of exp(score - m); -inf for no key.
__device__ __forceinline__ float lse_of(float m, float l) {
  return l > 0.f ? m + logf(l) : kNegInf;
}

// Lets `kernel` take up to the device's opt-in maximum of dynamic shared memory, set once
// per (kernel, device) and never lowered: each launch then passes its own size. Setting the
// attribute at every launch to that launch's size raced: two threads launching the generic
// kernel with different head sizes could each launch under the other's smaller limit.
inline cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;  // the default limit
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> raised;
  std::lock_guard<std::mutex> lock(mu);
  if (raised.count({kernel, device})) return cudaSuccess;
  int optin = 0;
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  if (bytes > size_t(optin)) return cudaErrorInvalidValue;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (e == cudaSuccess) raised.insert({kernel, device});
  return e;
}

}  // namespace pagedkv::cuda
