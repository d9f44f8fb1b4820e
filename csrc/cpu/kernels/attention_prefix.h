// The matrix-style tile of the CPU attention: the prefix pass of cascade attention
// (paged_attention_lse with causal=False), where every row of the tile sees the same keys,
// and a causal prefill's tall tiles (no sliding window), where the rows see the keys up
// to their own position: the chunks below the tile's first row are shared by all, the
// last chunks (the diagonal) are masked per row by softmax_block. One work item is a
// tall tile, query rows times the GQA heads of one kv head (up to 256 vectors, the knob
// cpu_prefix_vectors_per_head). So each block of K/V is
// read from memory once and packed once for the whole tile, a chunk of up to 64 keys
// (several blocks) at a time, and the tile runs matrix-style instead of as a loop of
// decodes, with one online-softmax update per chunk:
//   scores: outer products of each query vector with the chunk's keys, laid out
//           d-major (one vector of keys per head dimension): no horizontal sums;
//   values: the chunk's V rows, widened once, against every vector's probabilities.
// With bf16 queries and cache (AVX-512 BF16) both products use vdpbf16ps on packed
// pairs: keys packed as (k[d], k[d+1]) per key, values as (v_j[d], v_j+1[d]) per
// dimension, and the probabilities rounded to bf16 for P.V as GPU flash-attention
// kernels do (the running sum stays float32). Every other dtype works in float32.
// Part of attention_kernel.h (it uses its helpers and is included at its end).
#pragma once

#include <type_traits>
#include <utility>
#include <vector>

namespace pagedkv::cpu::PAGEDKV_ISA_NS {

// A tile at least this tall runs the matrix-style path; shorter ones the decode path.
constexpr int kPrefixMinVectors = 16;
// Keys per chunk: one softmax update (max, exp, rescale of every accumulator row) per
// chunk instead of per 16-key block; packed keys and values stay in L1/L2.
constexpr int kPrefixChunkKeys = 64;
// Key vectors per register tile of the scores (each query broadcast feeds this many).
constexpr int kKeyVecs = kVec == 16 ? 4 : 2;

inline bool is_prefix_tile(const AttnArgs& a, const WorkItem& it) {
  const int group = a.num_heads / a.num_kv_heads;
  return (!a.causal || a.sliding_window <= 0) && it.kv_head_end - it.kv_head_begin == 1 &&
         (it.row_end - it.row_begin) * group >= kPrefixMinVectors;
}

// Runs f(i0, Int<r>) over groups of R of n items (query vectors, key vectors), then the
// remainder (1..R-1) at once.
template <int R, typename F>
inline void for_row_groups(int nv, F&& f) {
  int v = 0;
  for (; v + R <= nv; v += R) f(v, std::integral_constant<int, R>{});
  const int rest = nv - v;
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((rest == I + 1 ? f(v, std::integral_constant<int, I + 1>{}) : void()), ...);
  }(std::make_integer_sequence<int, R - 1>{});
}

// ---------------------------------------------------------------- float32 path

// kt[d * SP + j] = k_j[d] widened to float32 for the chunk's n keys (rows[j]); columns
// n..SP are 0. row: scratch of DP floats.
template <typename cache_t>
inline void pack_keys(const cache_t* const* rows, int n, int64_t D, int64_t SP,
                      const Loader<cache_t>& load, float* row, float* kt) {
  for (int j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; d += kVec) load_chunk(load, rows[j], d, D).store(row + d);
    for (int64_t d = 0; d < D; ++d) kt[d * SP + j] = row[d];
  }
  if (n < SP) {
    for (int64_t d = 0; d < D; ++d) std::fill(kt + d * SP + n, kt + (d + 1) * SP, 0.f);
  }
}

// s[r * SP + c0 + j] = q_r . k_j for R pre-scaled query vectors (row stride DP) and the
// NC * kVec keys from c0 of the packed chunk: one broadcast feeds NC FMAs.
template <int R, int NC>
inline void qk_outer(const float* q, int64_t DP, const float* kt, int64_t SP, int64_t c0,
                     int64_t D, float* s) {
  Vec acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec k[NC];
    for (int c = 0; c < NC; ++c) k[c] = Vec::loadu(kt + d * SP + c0 + c * kVec);
    for (int r = 0; r < R; ++r) {
      const Vec qv(q[r * DP + d]);
      for (int c = 0; c < NC; ++c) acc[r][c] = at::vec::fmadd(qv, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c].store(s + r * SP + c0 + c * kVec);
}

// ---------------------------------------------------------------- bf16 path
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)

// kp[dp * SP + j] = the 32-bit pair (k_j[2 dp], k_j[2 dp + 1]) of the chunk's n keys
// (rows[j]); columns n..SP are 0.
inline void pack_key_pairs(const c10::BFloat16* const* rows, int n, int64_t DH, int64_t SP,
                           uint32_t* kp) {
  for (int j = 0; j < n; ++j) {
    for (int64_t dp = 0; dp < DH; ++dp) std::memcpy(kp + dp * SP + j, rows[j] + 2 * dp, 4);
  }
  if (n < SP) {
    for (int64_t dp = 0; dp < DH; ++dp) std::fill(kp + dp * SP + n, kp + (dp + 1) * SP, 0u);
  }
}

// vp[jp * VP + 2 d + e] = v_{2 jp + e}[d] (rows[j] = v_j): each vector of 32 bf16 holds 16
// dimensions of two consecutive keys, as vdpbf16ps pairs them (a missing odd key is 0).
inline void pack_value_pairs(const c10::BFloat16* const* rows, int n, int64_t D, int64_t VP,
                             uint16_t* vp) {
  alignas(64) static constexpr uint16_t kLo[32] = {
      0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {
      16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
      24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int jp = 0; 2 * jp < n; ++jp) {
    const c10::BFloat16* a = rows[2 * jp];
    const c10::BFloat16* b = 2 * jp + 1 < n ? rows[2 * jp + 1] : nullptr;
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 m = d + 32 <= D ? ~__mmask32(0) : __mmask32((1ull << (D - d)) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(m, a + d);
      const __m512i y = b ? _mm512_maskz_loadu_epi16(m, b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + jp * VP + 2 * d, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(vp + jp * VP + 2 * d + 32, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// s[r * SP + c0 + j] = mul * q_r . k_j for R bf16 query vectors (as 32-bit pairs, row
// stride QW) and the 16 NC keys from c0 of the packed chunk.
template <int R, int NC>
inline void qk_pairs(const uint32_t* qw, int64_t QW, const uint32_t* kp, int64_t SP, int64_t c0,
                     int64_t DH, float mul, float* s) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < DH; ++dp) {
    __m512bh k[NC];
    for (int c = 0; c < NC; ++c) k[c] = (__m512bh)_mm512_loadu_si512(kp + dp * SP + c0 + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(int(qw[r * QW + dp]));
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, k[c]);
    }
  }
  const __m512 mv = _mm512_set1_ps(mul);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c)
      _mm512_storeu_ps(s + r * SP + c0 + 16 * c, _mm512_mul_ps(acc[r][c], mv));
}

// acc_r[d0, d0 + 16 NC) += sum_j p_r[j] v_j[...] for R vectors: their probabilities as
// bf16 pairs (pw, row stride PW) against npairs packed key pairs.
template <int R, int NC>
inline void pv_pairs(float* acc, int64_t DP, const uint32_t* pw, int64_t PW, const uint16_t* vp,
                     int64_t VP, int npairs, int64_t d0) {
  __m512 o[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) o[r][c] = _mm512_loadu_ps(acc + r * DP + d0 + 16 * c);
  for (int jp = 0; jp < npairs; ++jp) {
    __m512bh x[NC];
    for (int c = 0; c < NC; ++c)
      x[c] = (__m512bh)_mm512_loadu_si512(vp + jp * VP + 2 * (d0 + 16 * c));
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pw[r * PW + jp]));
      for (int c = 0; c < NC; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], w, x[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + r * DP + d0 + 16 * c, o[r][c]);
}
#endif

// Runs f(c0, Int<nc>) over the SP / W vectors of W keys (or dims) of a row, NC at a time;
// c0 is the first key of a group.
template <int NC, typename F>
inline void for_key_groups(int64_t SP, int W, F&& f) {
  for_row_groups<NC>(int(SP / W), [&](int c, auto nc) { f(int64_t(c) * W, nc); });
}

template <typename q_t, typename cache_t>
void attention_prefix_item(const TypedArgs<q_t, cache_t>& a, const WorkItem& it,
                           Scratch& scratch) {
  const int64_t D = a.head_size;
  const int64_t DP = (D + kVec - 1) / kVec * kVec;
  const int64_t BS = a.block_size;
  const int64_t CB = std::max<int64_t>(1, kPrefixChunkKeys / BS);  // blocks per chunk
  const int64_t SP = (CB * BS + 15) / 16 * 16;  // padded score row: a chunk's keys
  const int G = a.num_heads / a.num_kv_heads;
  const int NV = (it.row_end - it.row_begin) * G;  // vector v is (row v / G, head v % G)
  const int64_t q0 = a.query_start_loc[it.seq];
  const int64_t q_len = a.query_start_loc[it.seq + 1] - q0;
  const int64_t seq_len = a.seq_lens[it.seq];
  auto row_of = [&](int v) { return it.row_begin + v / G; };
  auto head_of = [&](int v) { return it.kv_head_begin * G + v % G; };
  auto q_row = [&](int v) {
    return a.q() + (q0 + row_of(v)) * a.q_stride_tok + head_of(v) * a.q_stride_head;
  };
  constexpr bool bf16_dot = kBf16Dot && std::is_same_v<cache_t, c10::BFloat16> &&
                            std::is_same_v<q_t, c10::BFloat16>;
  const int64_t DQ = (D + 31) / 32 * 32;  // bf16 rows padded to whole vectors
  const int64_t VP = 2 * DQ;              // a packed pair of value rows
  const int64_t PW = SP / 2;              // probability pairs per vector

  // float32: [NV][DP] queries, [NV][DP] acc, [NV][SP] scores, m, l, [D][SP] keys,
  // [SP][DP] values (widened), [DP] row; bf16 extra: queries, key pairs, value pairs, p.
  scratch.f32.resize(size_t(NV) * (2 * DP + SP + 2) + size_t(D) * SP + size_t(SP + 1) * DP);
  float* qf = scratch.f32.data();
  float* acc = qf + NV * DP;
  float* s = acc + NV * DP;
  float* m = s + NV * SP;
  float* l = m + NV;
  float* kt = l + NV;
  float* vf = kt + D * SP;
  float* row = vf + SP * DP;
  if constexpr (bf16_dot) {
    scratch.bf16.resize(size_t(NV) * DQ + size_t(SP / 2) * VP);
    scratch.u32.resize(size_t(D / 2) * SP + size_t(NV) * PW);
  }
  // bf16 buffers, used only by the vdpbf16ps path (AVX-512 BF16 builds).
  [[maybe_unused]] uint16_t* qb = scratch.bf16.data();
  [[maybe_unused]] uint16_t* vp = qb + NV * DQ;
  [[maybe_unused]] uint32_t* kp = scratch.u32.data();
  [[maybe_unused]] uint32_t* pw = kp + (D / 2) * SP;

  const float qmul = a.scale * a.k_scale;
  for (int v = 0; v < NV; ++v) {
    const q_t* qr = q_row(v);
    if constexpr (bf16_dot) {
      std::memcpy(qb + v * DQ, qr, D * sizeof(uint16_t));
      std::fill(qb + v * DQ + D, qb + (v + 1) * DQ, uint16_t(0));
    } else {
      for (int64_t d = 0; d < D; ++d) qf[v * DP + d] = static_cast<float>(qr[d]) * qmul;
      std::fill(qf + v * DP + D, qf + (v + 1) * DP, 0.f);
    }
    std::fill(acc + v * DP, acc + (v + 1) * DP, 0.f);
    m[v] = -std::numeric_limits<float>::infinity();
    l[v] = 0.f;
  }

  const int32_t* table = a.block_table + it.seq * a.block_table_stride;
  const int64_t stride = a.cache_stride_tok;
  auto row_at = [&](const cache_t* cache, int64_t t) {  // key t's row of this kv head
    return cache + (int64_t(table[t / BS]) * BS + t % BS) * stride +
           int64_t(it.kv_head_begin) * D;
  };
  const Loader<cache_t> load;
  std::vector<const cache_t*> krows(SP), vrows(SP);
  // Keys [0, k_end): all of them (causal=False), or up to the tile's last row.
  const int64_t k_end = a.causal ? seq_len - q_len + it.row_end : seq_len;
  for (int64_t t0 = 0; t0 < k_end; t0 += CB * BS) {
    const int64_t t1 = std::min(t0 + CB * BS, k_end);
    const int n = int(t1 - t0);
    for (int j = 0; j < n; ++j) {
      krows[j] = row_at(a.k_cache(), t0 + j);
      vrows[j] = row_at(a.v_cache(), t0 + j);
    }
    // The next chunk's rows: the tile's work on this chunk hides the burst.
    for (int64_t t = t1; t < std::min(t1 + CB * BS, k_end); ++t) {
      prefetch_rows(row_at(a.k_cache(), t), stride, 1, D);
      prefetch_rows(row_at(a.v_cache(), t), stride, 1, D);
    }

    if constexpr (bf16_dot) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
      pack_key_pairs(krows.data(), n, D / 2, SP, kp);
      const uint32_t* qw = reinterpret_cast<const uint32_t*>(qb);
      for_key_groups<4>(SP, 16, [&](int64_t c0, auto nc) {
        for_row_groups<4>(NV, [&](int v, auto r) {
          qk_pairs<decltype(r)::value, decltype(nc)::value>(qw + v * (DQ / 2), DQ / 2, kp, SP,
                                                             c0, D / 2, qmul, s + v * SP);
        });
      });
#endif
    } else {
      pack_keys(krows.data(), n, D, SP, load, row, kt);
      for_key_groups<kKeyVecs>(SP, kVec, [&](int64_t c0, auto nc) {
        for_row_groups<4>(NV, [&](int v, auto r) {
          qk_outer<decltype(r)::value, decltype(nc)::value>(qf + v * DP, DP, kt, SP, c0, D,
                                                            s + v * SP);
        });
      });
    }

    softmax_block(a, s, SP, NV, t0, t1, seq_len - q_len, m, l, acc, DP, row_of, head_of);

    if constexpr (bf16_dot) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
      pack_value_pairs(vrows.data(), n, D, VP, vp);
      for (int v = 0; v < NV; ++v) {
        for (int64_t c0 = 0; c0 < SP; c0 += 16) {
          const __m256bh p = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + v * SP + c0));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw + v * PW + c0 / 2), (__m256i)p);
        }
      }
      const int npairs = (n + 1) / 2;
      for_row_groups<4>(NV, [&](int v, auto r) {
        constexpr int R = decltype(r)::value;
        for_key_groups<4>(DP, 16, [&](int64_t d0, auto nc) {
          pv_pairs<R, decltype(nc)::value>(acc + v * DP, DP, pw + v * PW, PW, vp, VP, npairs,
                                            d0);
        });
      });
#endif
    } else {
      // Value rows as float32, widened once for the whole tile.
      for (int j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; d += kVec)
          load_chunk(load, vrows[j], d, D).store(vf + j * DP + d);
      const Loader<float> fload;
      for_vector_groups(NV, [&](int v, auto nq) {
        pv_accumulate<decltype(nq)::value>(acc + v * DP, DP, s + v * SP, SP, vf, DP, n, D,
                                           fload);
      });
    }
  }

  write_rows(a, q0, NV, D, DP, acc, m, l, row_of, head_of);
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
