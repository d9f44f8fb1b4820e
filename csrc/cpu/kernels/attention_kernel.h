// CPU paged attention: one online-softmax pass over each sequence's cache blocks
// (flash-decoding style), float32 accumulation, K/V read in place from the paged cache.
// The same kernel serves paged_attention_lse: it also writes each row's log-sum-exp
// (m + log l of its online softmax), and with causal=False every row of a sequence sees
// all of its keys, so a shared prefix's rows form one tile that reads each K/V row once.
//
// A work item is (sequence, a range of kv heads, a tile of that sequence's query rows).
// All query heads of each kv head's GQA group and all rows of the tile are processed
// together, so each K/V row is read from memory once per item; a decode item covers
// all kv heads when there are enough sequences to keep the threads busy, so it sweeps
// whole cache blocks (contiguous memory) instead of one head's rows at a 4 KB stride.
// Items are pulled from a shared counter by the threads (longest first), which keeps
// 2 cores busy for decode batches and for a single long prefill alike.
#pragma once

#include "cpu/attention_cpu.h"
#include "cpu/kernels/vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pagedkv::cpu::PAGEDKV_ISA_NS {

// The same arguments with the element types of one kernel instantiation.
template <typename q_t, typename cache_t>
struct TypedArgs : AttnArgs {
  explicit TypedArgs(const AttnArgs& a) : AttnArgs(a) {}
  const q_t* q() const { return static_cast<const q_t*>(query); }
  q_t* o() const { return static_cast<q_t*>(out); }
  const cache_t* k_cache() const { return static_cast<const cache_t*>(key_cache); }
  const cache_t* v_cache() const { return static_cast<const cache_t*>(value_cache); }
};

// Loads the vector of cache row r starting at element d, zero-filled past the head size
// (only possible when the head size is not a multiple of the vector width).
template <typename cache_t>
inline Vec load_chunk(const Loader<cache_t>& load, const cache_t* r, int64_t d, int64_t D) {
  return d + kVec <= D ? load(r + d) : load.tail(r + d, int(D - d));
}

// Scores of NQ query vectors (q, row stride ld, zero-padded to a whole vector) against
// n cache rows (k, row stride k_stride): s[v * s_ld + j] = q_v . k_j.
template <int NQ, typename cache_t>
inline void qk_scores(const float* q, int64_t ld, const cache_t* k, int64_t k_stride, int n,
                      int64_t D, const Loader<cache_t>& load, float* s, int64_t s_ld) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {  // two rows at once: each query load feeds two FMAs
    const cache_t* k0 = k + j * k_stride;
    const cache_t* k1 = k0 + k_stride;
    Vec a0[NQ], a1[NQ];
    for (int v = 0; v < NQ; ++v) a0[v] = a1[v] = Vec(0.f);
    for (int64_t d = 0; d < D; d += kVec) {
      const Vec x0 = load_chunk(load, k0, d, D), x1 = load_chunk(load, k1, d, D);
      for (int v = 0; v < NQ; ++v) {
        const Vec qv = Vec::loadu(q + v * ld + d);
        a0[v] = at::vec::fmadd(qv, x0, a0[v]);
        a1[v] = at::vec::fmadd(qv, x1, a1[v]);
      }
    }
    for (int v = 0; v < NQ; ++v) {
      s[v * s_ld + j] = hsum(a0[v]);
      s[v * s_ld + j + 1] = hsum(a1[v]);
    }
  }
  for (; j < n; ++j) {
    const cache_t* kr = k + j * k_stride;
    Vec acc[NQ];
    for (int v = 0; v < NQ; ++v) acc[v] = Vec(0.f);
    for (int64_t d = 0; d < D; d += kVec) {
      const Vec kv = load_chunk(load, kr, d, D);
      for (int v = 0; v < NQ; ++v) acc[v] = at::vec::fmadd(Vec::loadu(q + v * ld + d), kv, acc[v]);
    }
    for (int v = 0; v < NQ; ++v) s[v * s_ld + j] = hsum(acc[v]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The 16 horizontal sums of a[0..15] in one vector (lane i = sum of a[i]): a transpose
// tree of 45 instructions instead of 16 separate reductions of about 8 each. Forced
// inline: as a call, GCC spilled the 16 accumulators to memory (8% of bf16 decode).
__attribute__((always_inline)) inline __m512 hsum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                   _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                   _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// Writes r's four 128-bit lanes (lane v = rows 0..3 of query vector v), times mul.
inline void store_tile4x4(__m512 r, float mul, float* s, int64_t s_ld) {
  r = _mm512_mul_ps(r, _mm512_set1_ps(mul));
  _mm_storeu_ps(s, _mm512_extractf32x4_ps(r, 0));
  _mm_storeu_ps(s + s_ld, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(s + 2 * s_ld, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(s + 3 * s_ld, _mm512_extractf32x4_ps(r, 3));
}

// Scores of 4 query vectors x 4 cache rows: each row load feeds 4 FMAs and each query
// load 4, and the 16 sums reduce together.
template <typename cache_t>
inline void qk_tile4x4(const float* q, int64_t ld, const cache_t* k, int64_t k_stride,
                       int64_t D, const Loader<cache_t>& load, float* s, int64_t s_ld) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += kVec) {
    __m512 kv[4];
    for (int t = 0; t < 4; ++t) kv[t] = load_chunk(load, k + t * k_stride, d, D);
    for (int v = 0; v < 4; ++v) {
      const __m512 qv = _mm512_loadu_ps(q + v * ld + d);
      for (int t = 0; t < 4; ++t) acc[v * 4 + t] = _mm512_fmadd_ps(qv, kv[t], acc[v * 4 + t]);
    }
  }
  store_tile4x4(hsum16(acc), 1.f, s, s_ld);
}
#endif

// acc_v[d, d + C * kVec) += sum_j p[v * p_ld + j] * v_j for NQ vectors over n cache rows:
// the NQ x C accumulators stay in registers across all rows, and each probability
// broadcast feeds C FMAs. kWhole: the C vectors lie inside the head (plain loads).
template <int NQ, int C, bool kWhole, typename cache_t>
inline void pv_vectors(float* acc, int64_t ld, const float* p, int64_t p_ld, const cache_t* vrow,
                       int64_t v_stride, int n, int64_t d, int64_t D, const Loader<cache_t>& load) {
  Vec a[NQ][C];
  for (int v = 0; v < NQ; ++v)
    for (int c = 0; c < C; ++c) a[v][c] = Vec::loadu(acc + v * ld + d + c * kVec);
  for (int j = 0; j < n; ++j) {
    Vec x[C];
    for (int c = 0; c < C; ++c) {
      const cache_t* r = vrow + j * v_stride;
      x[c] = kWhole ? load(r + d + c * kVec) : load_chunk(load, r, d + c * kVec, D);
    }
    for (int v = 0; v < NQ; ++v) {
      const Vec pj(p[v * p_ld + j]);
      for (int c = 0; c < C; ++c) a[v][c] = at::vec::fmadd(pj, x[c], a[v][c]);
    }
  }
  for (int v = 0; v < NQ; ++v)
    for (int c = 0; c < C; ++c) a[v][c].store(acc + v * ld + d + c * kVec);
}

// acc_v += sum_j p[v * p_ld + j] * v_j for NQ vectors over n cache rows (acc rows padded
// to a whole vector; the padding stays zero): 4 vectors of the head dim per pass with
// AVX-512 (16 accumulators of 32 registers), 2 with AVX2 (16 registers).
template <int NQ, typename cache_t>
inline void pv_accumulate(float* acc, int64_t ld, const float* p, int64_t p_ld, const cache_t* vrow,
                          int64_t v_stride, int n, int64_t D, const Loader<cache_t>& load) {
  constexpr int C = kVec == 16 ? 4 : 2;
  int64_t d = 0;
  for (; d + C * kVec <= D; d += C * kVec)
    pv_vectors<NQ, C, true>(acc, ld, p, p_ld, vrow, v_stride, n, d, D, load);
  for (; d + 2 * kVec <= D; d += 2 * kVec)
    pv_vectors<NQ, 2, true>(acc, ld, p, p_ld, vrow, v_stride, n, d, D, load);
  for (; d + kVec <= D; d += kVec)
    pv_vectors<NQ, 1, true>(acc, ld, p, p_ld, vrow, v_stride, n, d, D, load);
  if (d < D) pv_vectors<NQ, 1, false>(acc, ld, p, p_ld, vrow, v_stride, n, d, D, load);
}

// Pulls n cache rows (head_size elements each, stride apart) into L1 ahead of use.
// Blocks sit at random places, and the hardware prefetcher does not cross the 4 KB
// pages a block spans, so without this the kernel waits on every row.
template <typename cache_t>
inline void prefetch_rows(const cache_t* rows, int64_t stride, int n, int64_t head_size) {
  const int64_t bytes = head_size * int64_t(sizeof(cache_t));
  for (int j = 0; j < n; ++j) {
    const char* r = reinterpret_cast<const char*>(rows + j * stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 2);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// bf16 query and cache: vdpbf16ps multiplies 32 bf16 pairs and accumulates in float32,
// skipping the widening of K (the products of two bf16 values are exact in float32).
constexpr bool kBf16Dot = true;

// 32 bf16 elements of cache row r from element d, zero past the head size D.
inline __m512i load_bf16_chunk(const c10::BFloat16* r, int64_t d, int64_t D) {
  return d + 32 <= D ? _mm512_loadu_si512(r + d)
                     : _mm512_maskz_loadu_epi16(__mmask32((1ull << (D - d)) - 1), r + d);
}

// s[v * s_ld + j] = mul * (q_v . k_j) for NQ bf16 query rows (row stride ld elements,
// zero-padded to a multiple of 32) against n bf16 cache rows.
template <int NQ>
inline void qk_scores_bf16(const uint16_t* q, int64_t ld, const c10::BFloat16* k, int64_t k_stride,
                           int n, int64_t D, float mul, float* s, int64_t s_ld) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {  // two rows at once: each query load feeds two dot products
    const c10::BFloat16* k0 = k + j * k_stride;
    const c10::BFloat16* k1 = k0 + k_stride;
    __m512 a0[NQ], a1[NQ];
    for (int v = 0; v < NQ; ++v) a0[v] = a1[v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh x0 = (__m512bh)load_bf16_chunk(k0, d, D),
                      x1 = (__m512bh)load_bf16_chunk(k1, d, D);
      for (int v = 0; v < NQ; ++v) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + v * ld + d);
        a0[v] = _mm512_dpbf16_ps(a0[v], qv, x0);
        a1[v] = _mm512_dpbf16_ps(a1[v], qv, x1);
      }
    }
    for (int v = 0; v < NQ; ++v) {
      s[v * s_ld + j] = _mm512_reduce_add_ps(a0[v]) * mul;
      s[v * s_ld + j + 1] = _mm512_reduce_add_ps(a1[v]) * mul;
    }
  }
  for (; j < n; ++j) {
    const c10::BFloat16* kr = k + j * k_stride;
    __m512 acc[NQ];
    for (int v = 0; v < NQ; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512bh kv = (__m512bh)load_bf16_chunk(kr, d, D);
      for (int v = 0; v < NQ; ++v)
        acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_loadu_si512(q + v * ld + d), kv);
    }
    for (int v = 0; v < NQ; ++v) s[v * s_ld + j] = _mm512_reduce_add_ps(acc[v]) * mul;
  }
}

// qk_tile4x4 for bf16 queries and cache, with vdpbf16ps.
inline void qk_tile4x4_bf16(const uint16_t* q, int64_t ld, const c10::BFloat16* k, int64_t k_stride,
                            int64_t D, float mul, float* s, int64_t s_ld) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512bh kv[4];
    for (int t = 0; t < 4; ++t) {
      kv[t] = (__m512bh)load_bf16_chunk(k + t * k_stride, d, D);
    }
    for (int v = 0; v < 4; ++v) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + v * ld + d);
      for (int t = 0; t < 4; ++t) acc[v * 4 + t] = _mm512_dpbf16_ps(acc[v * 4 + t], qv, kv[t]);
    }
  }
  store_tile4x4(hsum16(acc), mul, s, s_ld);
}

// P.V with vdpbf16ps: two value rows j, j+1 interleaved per dimension (vpunpck{l,h}wd:
// lane i of `lo` holds (v_j[d], v_j+1[d]) for d = 8 * (i / 4) + i % 4 of the 32-dim chunk,
// `hi` the same 4 dims further) against the broadcast probability pair (p_j, p_j+1)
// rounded to bf16, as GPU flash-attention kernels do (the running sum l stays float32).
// One instruction does 2 rows x 16 dims, and V is never widened to float32. The
// accumulator rows keep that unpack order; unpermute_pv_chunks restores it at the end.

// acc_v (C chunks of 32 dims from d, unpack order) += P_v . V over n rows; p2 holds the
// bf16 probability pairs of vector v at p2[v * p2_ld + j / 2].
template <int NQ, int C>
inline void pv_chunks_bf16(float* acc, int64_t ld, const uint32_t* p2, int64_t p2_ld,
                           const c10::BFloat16* vrow, int64_t v_stride, int n, int64_t d,
                           int64_t D) {
  __m512 lo[NQ][C], hi[NQ][C];
  for (int v = 0; v < NQ; ++v)
    for (int c = 0; c < C; ++c) {
      lo[v][c] = _mm512_loadu_ps(acc + v * ld + d + 32 * c);
      hi[v][c] = _mm512_loadu_ps(acc + v * ld + d + 32 * c + 16);
    }
  auto rows = [&](int pair, const c10::BFloat16* r0, const c10::BFloat16* r1) {
    __m512i x[C][2];
    for (int c = 0; c < C; ++c) {
      const __m512i a = load_bf16_chunk(r0, d + 32 * c, D);
      const __m512i b = r1 ? load_bf16_chunk(r1, d + 32 * c, D) : _mm512_setzero_si512();
      x[c][0] = _mm512_unpacklo_epi16(a, b);
      x[c][1] = _mm512_unpackhi_epi16(a, b);
    }
    for (int v = 0; v < NQ; ++v) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(int(p2[v * p2_ld + pair]));
      for (int c = 0; c < C; ++c) {
        lo[v][c] = _mm512_dpbf16_ps(lo[v][c], pv, (__m512bh)x[c][0]);
        hi[v][c] = _mm512_dpbf16_ps(hi[v][c], pv, (__m512bh)x[c][1]);
      }
    }
  };
  const int pairs = n / 2;
  for (int i = 0; i < pairs; ++i) rows(i, vrow + 2 * i * v_stride, vrow + (2 * i + 1) * v_stride);
  if (n % 2) rows(pairs, vrow + (n - 1) * v_stride, nullptr);  // odd row count: pairs with zeros
  for (int v = 0; v < NQ; ++v)
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(acc + v * ld + d + 32 * c, lo[v][c]);
      _mm512_storeu_ps(acc + v * ld + d + 32 * c + 16, hi[v][c]);
    }
}

// Two chunks (64 dims) per pass: 16 accumulators for 4 vectors, each probability
// broadcast feeds 4 instructions.
template <int NQ>
inline void pv_accumulate_bf16(float* acc, int64_t ld, const uint32_t* p2, int64_t p2_ld,
                               const c10::BFloat16* vrow, int64_t v_stride, int n,
                               int64_t D) {
  int64_t d = 0;
  for (; d + 32 < D; d += 64) pv_chunks_bf16<NQ, 2>(acc, ld, p2, p2_ld, vrow, v_stride, n, d, D);
  if (d < D) pv_chunks_bf16<NQ, 1>(acc, ld, p2, p2_ld, vrow, v_stride, n, d, D);
}

// n probabilities -> bf16 pairs (p[2i], p[2i+1]) as one uint32 each; n a multiple of 16.
inline void pack_prob_pairs(const float* p, int64_t n, uint32_t* p2) {
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p2 + j / 2),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + j)));
}

// Restores dimension order in an accumulator row written by pv_chunks_bf16 (DP a multiple
// of 32): position 4L + i of a chunk holds dim 8L + i, position 16 + 4L + i dim 8L + 4 + i.
inline void unpermute_pv_chunks(float* row, int64_t DP) {
  float t[32];
  for (int64_t c = 0; c < DP; c += 32) {
    std::memcpy(t, row + c, sizeof t);
    for (int k = 0; k < 32; ++k) row[c + k] = t[(k % 8 < 4 ? 0 : 12) + 4 * (k / 8) + k % 8];
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

// Value rows folded into the accumulators per pass (a whole block of 16): the
// accumulators stay in registers across them.
constexpr int kPvTokens = 16;
// How many blocks ahead the rows are prefetched.
constexpr int kPrefetchBlocks = 2;
// Keys per online-softmax update (max, exp, rescale, one per query vector): 32 halves
// the update's share of a 16-token block's work (measured: about a third of the bf16
// kernel's instructions per cache row at one block per update).
constexpr int kChunkKeys = 32;

// Runs f(Int<NQ>) on groups of at most 4 query vectors (a register tile).
template <typename F>
inline void for_vector_groups(int nv, F&& f) {
  int v = 0;
  for (; v + 4 <= nv; v += 4) f(v, std::integral_constant<int, 4>{});
  switch (nv - v) {
    case 3: f(v, std::integral_constant<int, 3>{}); break;
    case 2: f(v, std::integral_constant<int, 2>{}); break;
    case 1: f(v, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Per-thread buffers, grown once and reused by every work item the thread runs.
struct Scratch {
  std::vector<float> f32;      // queries, accumulators, scores, running max and sum
  std::vector<uint16_t> bf16;  // bf16 queries for vdpbf16ps (and packed values, prefix tile)
  std::vector<uint32_t> u32;   // packed key and probability pairs (prefix tile)
};

// One block of keys [t0, t1) for NV query vectors whose scores (already scaled) are in s
// [NV][SP]: softcap, ALiBi and the causal / window mask, then the online-softmax update:
// s becomes the probabilities (0 past the block's keys), m and l the running max and sum,
// and each accumulator row of acc [NV][DP] is rescaled to the new max.
template <typename RowOf, typename HeadOf>
inline void softmax_block(const AttnArgs& a, float* s, int64_t SP, int NV, int64_t t0,
                          int64_t t1, int64_t base_pos, float* m, float* l, float* acc,
                          int64_t DP, RowOf row_of, HeadOf head_of) {
  const int n = int(t1 - t0);
  const int64_t W = a.sliding_window;
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  for (int v = 0; v < NV; ++v) {
    float* sv = s + v * SP;
    const int64_t p = base_pos + row_of(v);
    if (a.softcap > 0.f) {
      for (int j = 0; j < n; ++j) sv[j] = a.softcap * std::tanh(sv[j] / a.softcap);
    }
    if (a.alibi_slopes != nullptr) {
      const float slope = a.alibi_slopes[head_of(v)];
      for (int j = 0; j < n; ++j) sv[j] += slope * float(t0 + j - p);
    }
    // Causal and window mask; whole-block fast path when every key is visible.
    if (a.causal && (t1 - 1 > p || (W > 0 && t0 <= p - W))) {
      for (int j = 0; j < n; ++j) {
        const int64_t k = t0 + j;
        if (k > p || (W > 0 && k <= p - W)) sv[j] = -std::numeric_limits<float>::infinity();
      }
    }
    for (int j = n; j < SP; ++j) sv[j] = -std::numeric_limits<float>::infinity();

    Vec vmax = neg_inf;
    for (int64_t j = 0; j < SP; j += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(sv + j));
    const float bmax = hmax(vmax);
    if (bmax == -std::numeric_limits<float>::infinity()) {
      std::fill(sv, sv + SP, 0.f);  // nothing visible in this block for this row
      continue;
    }
    const float m_new = std::max(m[v], bmax);
    const float alpha = std::exp(m[v] - m_new);  // 0 on the first visible block
    const Vec mv(m_new);
    Vec sum(0.f);
    for (int64_t j = 0; j < SP; j += kVec) {
      const Vec x = Vec::loadu(sv + j);
      const Vec e = Vec::blendv((x - mv).exp_u20(), Vec(0.f), x == neg_inf);
      e.store(sv + j);
      sum = sum + e;
    }
    l[v] = l[v] * alpha + hsum(sum);
    m[v] = m_new;
    if (alpha != 1.f) {
      const Vec av(alpha);
      for (int64_t d = 0; d < DP; d += kVec) (Vec::loadu(acc + v * DP + d) * av).store(acc + v * DP + d);
    }
  }
}

// Normalized outputs (and lse when asked) of the NV query vectors of a work item. A row
// that saw no key (l = 0: only with causal=False over an empty sequence) gets 0 and -inf.
template <typename q_t, typename cache_t, typename RowOf, typename HeadOf>
inline void write_rows(const TypedArgs<q_t, cache_t>& a, int64_t q0, int NV, int64_t D,
                       int64_t DP, const float* acc, const float* m, const float* l,
                       RowOf row_of, HeadOf head_of) {
  for (int v = 0; v < NV; ++v) {
    const int64_t idx = (q0 + row_of(v)) * a.num_heads + head_of(v);
    q_t* o = a.o() + idx * D;
    if (l[v] == 0.f) {
      std::fill(o, o + D, static_cast<q_t>(0.f));
    } else {
      const float inv = a.v_scale / l[v];
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<q_t>(acc[v * DP + d] * inv);
    }
    if (a.lse != nullptr)
      a.lse[idx] = l[v] == 0.f ? -std::numeric_limits<float>::infinity() : m[v] + std::log(l[v]);
  }
}

template <typename q_t, typename cache_t>
void attention_item(const TypedArgs<q_t, cache_t>& a, const WorkItem& it, Scratch& scratch) {
  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<cache_t, c10::BFloat16> &&
                            std::is_same_v<q_t, c10::BFloat16>;
  const int64_t D = a.head_size;
  // Padded query/accumulator row: whole vectors, or whole 32-dim chunks for bf16 P.V.
  constexpr int64_t kRowAlign = bf16_dot ? 32 : kVec;
  const int64_t DP = (D + kRowAlign - 1) / kRowAlign * kRowAlign;
  const int64_t BS = a.block_size;
  // Keys per online-softmax update: several whole blocks when the block size is even (the
  // bf16 P.V pairs rows within a block, so every block must start at an even offset).
  const int chunk_blocks = BS % 2 == 0 && BS < kChunkKeys ? int(kChunkKeys / BS) : 1;
  const int64_t SP = (chunk_blocks * BS + kVec - 1) / kVec * kVec;  // padded score row
  const int G = a.num_heads / a.num_kv_heads;
  const int nrows = it.row_end - it.row_begin;
  const int nkv = it.kv_head_end - it.kv_head_begin;
  const int NVH = nrows * G;  // query vectors per kv head: vector v is (kv head, row, group head)
  const int NV = NVH * nkv;
  const int64_t q0 = a.query_start_loc[it.seq];
  const int64_t q_len = a.query_start_loc[it.seq + 1] - q0;
  const int64_t seq_len = a.seq_lens[it.seq];
  const int64_t base_pos = seq_len - q_len;  // position of query row 0
  auto row_of = [&](int v) { return it.row_begin + (v % NVH) / G; };
  auto head_of = [&](int v) { return (it.kv_head_begin + v / NVH) * G + v % G; };
  auto q_row = [&](int v) {
    return a.q() + (q0 + row_of(v)) * a.q_stride_tok + head_of(v) * a.q_stride_head;
  };

  scratch.f32.resize(size_t(NV) * (2 * DP + SP + 2));
  float* qf = scratch.f32.data();  // [NV][DP] query * scale * k_scale
  float* acc = qf + NV * DP;   // [NV][DP] unnormalized output
  float* s = acc + NV * DP;    // [NV][SP] scores, then probabilities
  float* m = s + NV * SP;      // running max
  float* l = m + NV;           // running sum

  const float qmul = a.scale * a.k_scale;
  const int64_t DQ = (D + 31) / 32 * 32;  // bf16 query row, zero-padded for vdpbf16ps
  if constexpr (bf16_dot) {
    scratch.bf16.resize(size_t(NV) * DQ);
    scratch.u32.resize(size_t(NV) * SP / 2);
  }
  uint16_t* qb = scratch.bf16.data();
  [[maybe_unused]] uint32_t* p2 = scratch.u32.data();  // [NV][SP / 2] bf16 P.V pairs
  if constexpr (bf16_dot) {
    for (int v = 0; v < NV; ++v) {
      std::memcpy(qb + v * DQ, q_row(v), D * sizeof(uint16_t));
    }
  }
  for (int v = 0; v < NV; ++v) {
    const q_t* qr = q_row(v);
    for (int64_t d = 0; d < D; ++d) qf[v * DP + d] = static_cast<float>(qr[d]) * qmul;
    std::fill(qf + v * DP + D, qf + (v + 1) * DP, 0.f);
    std::fill(acc + v * DP, acc + (v + 1) * DP, 0.f);
    m[v] = -std::numeric_limits<float>::infinity();
    l[v] = 0.f;
  }

  const int64_t W = a.sliding_window;
  const int64_t p_first = base_pos + it.row_begin;
  const int64_t p_last = base_pos + it.row_end - 1;
  const int64_t k_lo = W > 0 ? std::max<int64_t>(0, p_first - W + 1) : 0;
  // Keys [k_lo, k_end): up to the tile's last row, or (causal=False) the whole sequence.
  const int64_t k_end = a.causal ? p_last + 1 : seq_len;
  const int32_t* table = a.block_table + it.seq * a.block_table_stride;
  const Loader<cache_t> load;
  const int64_t stride = a.cache_stride_tok;
  auto rows_at = [&](const cache_t* cache, int64_t b, int64_t t) {  // token t of logical block b
    return cache + (int64_t(table[b]) * BS + (t - b * BS)) * stride + int64_t(it.kv_head_begin) * D;
  };

  // The rows of the block kPrefetchBlocks ahead are fetched one head-row per head-row
  // computed, so memory traffic overlaps the arithmetic (a burst of prefetches per block
  // stalls instead: measured 11 vs 25-30 GB/s).
  struct Ahead {
    const cache_t* k = nullptr;
    const cache_t* v = nullptr;
    int n = 0;
  };
  auto ahead_of = [&](int64_t b) {
    Ahead next;
    const int64_t bn = b + kPrefetchBlocks, tn = bn * BS;
    if (tn < k_end) {
      next.n = int(std::min<int64_t>(BS, k_end - tn));
      next.k = rows_at(a.k_cache(), bn, tn);
      next.v = rows_at(a.v_cache(), bn, tn);
    }
    return next;
  };

  // Scores of keys [t0, t1) of block b into s at column o, token-major, four rows at a
  // time: each cache row (all kv heads of the item) is read front to back.
  auto block_scores = [&](int64_t b, int64_t t0, int64_t t1, int64_t o) {
    const int n = int(t1 - t0);
    const cache_t* kb = rows_at(a.k_cache(), b, t0);
    const Ahead next = ahead_of(b);
    const int nn = next.n;
    for (int j = 0; j < n; j += 4) {
      const int nj = std::min(4, n - j);
      for (int h = 0; h < nkv; ++h) {
        for (int t = j; t < j + nj && t < nn; ++t) prefetch_rows(next.k + t * stride + h * D, stride, 1, D);
        const cache_t* kr = kb + j * stride + h * D;
        for_vector_groups(NVH, [&](int v0, auto nq) {
          const int v = h * NVH + v0;
          float* sv = s + v * SP + o + j;
          constexpr int NQ = decltype(nq)::value;
          if constexpr (bf16_dot) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
            if (NQ == 4 && nj == 4)
              qk_tile4x4_bf16(qb + v * DQ, DQ, kr, stride, D, qmul, sv, SP);
            else
              qk_scores_bf16<NQ>(qb + v * DQ, DQ, kr, stride, nj, D, qmul, sv, SP);
#endif
          } else {
#if defined(CPU_CAPABILITY_AVX512)
            if (NQ == 4 && nj == 4) {
              qk_tile4x4(qf + v * DP, DP, kr, stride, D, load, sv, SP);
              return;
            }
#endif
            qk_scores<NQ>(qf + v * DP, DP, kr, stride, nj, D, load, sv, SP);
          }
        });
      }
    }
    if (nn > n) {
      prefetch_rows(next.k + n * stride, stride, nn - n, nkv * D);
      prefetch_rows(next.v + n * stride, stride, nn - n, nkv * D);
    }
  };

  // acc += P . V for keys [t0, t1) of block b, probabilities at column o of s.
  auto block_values = [&](int64_t b, int64_t t0, int64_t t1, int64_t o) {
    const int n = int(t1 - t0);
    const cache_t* vb = rows_at(a.v_cache(), b, t0);
    const Ahead next = ahead_of(b);
    const int nn = next.n;
    for (int j = 0; j < n; j += kPvTokens) {
      const int nj = std::min(kPvTokens, n - j);
      for (int h = 0; h < nkv; ++h) {
        if (j < nn) prefetch_rows(next.v + j * stride + h * D, stride, std::min(nj, nn - j), D);
        for_vector_groups(NVH, [&](int v0, auto nq) {
          const int v = h * NVH + v0;
          constexpr int NQ = decltype(nq)::value;
          if constexpr (bf16_dot) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
            pv_accumulate_bf16<NQ>(acc + v * DP, DP, p2 + v * SP / 2 + (o + j) / 2, SP / 2,
                                         vb + j * stride + h * D, stride, nj, D);
#endif
          } else {
            pv_accumulate<NQ>(acc + v * DP, DP, s + v * SP + o + j, SP,
                                    vb + j * stride + h * D, stride, nj, D, load);
          }
        });
      }
    }
  };

  // Chunks of chunk_blocks blocks; a chunk that starts inside a block (a sliding window's
  // first) holds that block alone, so every block of a chunk starts at an even column.
  for (int64_t b = k_lo / BS; b * BS < k_end;) {
    const int nb = b * BS < k_lo ? 1 : chunk_blocks;
    const int64_t c0 = std::max(b * BS, k_lo);
    const int64_t c1 = std::min((b + nb) * BS, k_end);
    auto for_blocks = [&](auto&& f) {
      for (int64_t bb = b; bb < b + nb && bb * BS < c1; ++bb) {
        const int64_t t0 = std::max(bb * BS, c0);
        f(bb, t0, std::min((bb + 1) * BS, c1), t0 - c0);
      }
    };
    for_blocks(block_scores);
    softmax_block(a, s, SP, NV, c0, c1, base_pos, m, l, acc, DP, row_of, head_of);
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (bf16_dot) {
      for (int v = 0; v < NV; ++v) pack_prob_pairs(s + v * SP, SP, p2 + v * SP / 2);
    }
#endif
    for_blocks(block_values);
    b += nb;
  }

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (bf16_dot) {
    for (int v = 0; v < NV; ++v) unpermute_pv_chunks(acc + v * DP, DP);
  }
#endif
  write_rows(a, q0, NV, D, DP, acc, m, l, row_of, head_of);
}

// The prefix pass's matrix-style tile (attention_prefix.h, included at the end).
inline bool is_prefix_tile(const AttnArgs& a, const WorkItem& it);
template <typename q_t, typename cache_t>
void attention_prefix_item(const TypedArgs<q_t, cache_t>& a, const WorkItem& it,
                           Scratch& scratch);

template <typename q_t, typename cache_t>
void attention_cpu(const TypedArgs<q_t, cache_t>& a, const std::vector<WorkItem>& items) {
  std::atomic<int64_t> next{0};
  const int64_t n = int64_t(items.size());
  auto run_items = [&] {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      if (is_prefix_tile(a, items[i]))
        attention_prefix_item<q_t, cache_t>(a, items[i], scratch);
      else
        attention_item<q_t, cache_t>(a, items[i], scratch);
    }
  };
  // Small work stays on the calling thread: an OpenMP region saves at most a few us
  // there, but waits a whole time slice (ms) when another process holds a core.
  if (a.serial) run_items();
  else at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { run_items(); });
}

// A query dtype equal to the cache dtype. The CPU kernels read the head and block size
// at run time: compile-time sizes (csrc/dispatch.h, as the CUDA kernels use) measured
// 0.97-1.08x on this machine's cache-resident decode and 0.93-1.09x at the 16 x 2048
// decode (benchmarks/RESULTS.md, "CPU decode: where the time goes"), so they did not pay
// for 8-32 instantiations per dtype.
template <typename T>
void attention_same_dtype(const AttnArgs& raw, const std::vector<WorkItem>& items) {
  attention_cpu<T, T>(TypedArgs<T, T>(raw), items);
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS

#include "cpu/kernels/attention_prefix.h"
