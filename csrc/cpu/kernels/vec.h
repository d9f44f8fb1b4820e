// Float vectors for the CPU kernels (8 lanes with AVX2, 16 with AVX-512): loads that
// widen any cache dtype to float32 in registers (whole vectors, and a zero-filled tail
// for head sizes that are not a multiple of the width), a horizontal sum, and an
// fp32 -> fp8 saturating quantizer. Built on at::vec::Vectorized<float>; the ISA comes
// from the CPU_CAPABILITY_* macros that the variant's prologue (cpu/variant/*.h) sets,
// and everything here lives in that variant's namespace (PAGEDKV_ISA_NS).
#pragma once

#ifndef PAGEDKV_ISA_NS
#error "compile the CPU kernels through a variant prologue (cpu/variant/*.h; setup.py)"
#endif

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace pagedkv::cpu {
// Lookup tables fp8 byte -> float (256 entries), built once (attention.cpp: scalar code,
// shared by every variant).
const float* fp8_table(bool e4m3);
}  // namespace pagedkv::cpu

namespace pagedkv::cpu::PAGEDKV_ISA_NS {

using Vec = at::vec::Vectorized<float>;
constexpr int kVec = Vec::size();
static_assert(kVec == 8 || kVec == 16, "the CPU kernels are written for 8 or 16 float lanes");
#if defined(CPU_CAPABILITY_AVX512)
static_assert(kVec == 16, "an AVX-512 variant must see at::vec's 16-float vectors");
#endif

// The first n (< kVec) elements widened to float, the other lanes zero.
template <typename T>
inline Vec load_tail_scalar(const T* p, int n, const float* table = nullptr) {
  float t[kVec] = {};
  for (int i = 0; i < n; ++i) {
    if (table != nullptr) t[i] = table[reinterpret_cast<const uint8_t*>(p)[i]];
    else t[i] = static_cast<float>(p[i]);
  }
  return Vec::loadu(t);
}

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 lanes(int n) { return __mmask16((1u << n) - 1); }

inline Vec load_vec(const float* p) { return Vec::loadu(p); }
inline Vec load_tail(const float* p, int n) { return Vec(_mm512_maskz_loadu_ps(lanes(n), p)); }

inline Vec widen_bf16(__m256i x) {
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
}
inline Vec load_vec(const c10::BFloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec load_tail(const c10::BFloat16* p, int n) {
  return widen_bf16(_mm256_maskz_loadu_epi16(lanes(n), p));
}
inline Vec load_vec(const c10::Half* p) {
  return Vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline Vec load_tail(const c10::Half* p, int n) {
  return Vec(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p)));
}
template <typename fp8_t>
inline Vec load_vec_fp8(const fp8_t* p, const float* table) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm512_i32gather_ps(_mm512_cvtepu8_epi32(bytes), table, 4));
}
template <typename fp8_t>
inline Vec load_tail_fp8(const fp8_t* p, int n, const float* table) {
  // Masked-off bytes read as 0, and byte 0 is +0.0 in both fp8 formats.
  const __m128i bytes = _mm_maskz_loadu_epi8(lanes(n), p);
  return Vec(_mm512_i32gather_ps(_mm512_cvtepu8_epi32(bytes), table, 4));
}
#else
inline Vec load_vec(const float* p) { return Vec::loadu(p); }

inline Vec load_vec(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)));
#else
  return load_tail_scalar(p, kVec);
#endif
}

inline Vec load_vec(const c10::Half* p) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return load_tail_scalar(p, kVec);
#endif
}

template <typename fp8_t>
inline Vec load_vec_fp8(const fp8_t* p, const float* table) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(bytes), 4));
#else
  return load_tail_scalar(p, kVec, table);
#endif
}

template <typename T>
inline Vec load_tail(const T* p, int n) { return load_tail_scalar(p, n); }
template <typename fp8_t>
inline Vec load_tail_fp8(const fp8_t* p, int n, const float* table) {
  return load_tail_scalar(p, n, table);
}
#endif

// Loader for one cache dtype: holds the fp8 table pointer when it needs one.
template <typename T>
struct Loader {
  Vec operator()(const T* p) const { return load_vec(p); }
  Vec tail(const T* p, int n) const { return load_tail(p, n); }
};
template <typename fp8_t>
struct Fp8Loader {
  const float* table;
  Vec operator()(const fp8_t* p) const { return load_vec_fp8(p, table); }
  Vec tail(const fp8_t* p, int n) const { return load_tail_fp8(p, n, table); }
};
template <>
struct Loader<c10::Float8_e4m3fn> : Fp8Loader<c10::Float8_e4m3fn> {
  Loader() : Fp8Loader<c10::Float8_e4m3fn>{fp8_table(true)} {}
};
template <>
struct Loader<c10::Float8_e5m2> : Fp8Loader<c10::Float8_e5m2> {
  Loader() : Fp8Loader<c10::Float8_e5m2>{fp8_table(false)} {}
};

inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float t[kVec];
  v.store(t);
  float r = 0.f;
  for (int i = 0; i < kVec; ++i) r += t[i];
  return r;
#endif
}

inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  float t[kVec];
  v.store(t);
  float r = t[0];
  for (int i = 1; i < kVec; ++i) r = std::max(r, t[i]);
  return r;
#endif
}

// fp32 -> fp8: round_to_fp8(x / scale), saturated to the finite range, NaN stored as 0
// (an fp8 cache never holds inf or NaN).
template <typename fp8_t>
inline fp8_t quantize_fp8(float x, float scale) {
  const float kMax = static_cast<float>(std::numeric_limits<fp8_t>::max());
  float y = x / scale;
  y = std::isnan(y) ? 0.f : std::fmin(std::fmax(y, -kMax), kMax);
  return fp8_t(y);
}

// Bit layout of an fp8 format for the vector quantizer: the same steps as c10's scalar
// fp8 conversion (round to nearest even, subnormals through a float add), so both write
// identical bytes.
template <typename fp8_t>
struct Fp8Bits;
template <>
struct Fp8Bits<c10::Float8_e4m3fn> {
  static constexpr uint32_t kMinNormal = 121u << 23, kDenormMask = 141u << 23;
  static constexpr int kMantShift = 20;
  static constexpr int32_t kBiasAdd = int32_t((7 - 127) * (1 << 23)) + 0x7FFFF;
};
template <>
struct Fp8Bits<c10::Float8_e5m2> {
  static constexpr uint32_t kMinNormal = 113u << 23, kDenormMask = 134u << 23;
  static constexpr int kMantShift = 21;
  static constexpr int32_t kBiasAdd = int32_t((15 - 127) * (1 << 23)) + 0xFFFFF;
};

#if defined(CPU_CAPABILITY_AVX512)
// quantize_fp8 on 16 lanes: x / scale, NaN -> 0, saturated, rounded; 16 bytes out.
template <typename fp8_t>
inline void quantize_fp8_x16(const Vec& x, float scale, fp8_t* out) {
  using B = Fp8Bits<fp8_t>;
  const float fmax = static_cast<float>(std::numeric_limits<fp8_t>::max());
  __m512 y = _mm512_div_ps(x, _mm512_set1_ps(scale));
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-fmax)), _mm512_set1_ps(fmax));
  y = _mm512_mask_mov_ps(y, nan, _mm512_setzero_ps());
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32(int32_t(0x80000000u)));
  const __m512i mag = _mm512_xor_si512(bits, sign);
  const __mmask16 sub = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(int32_t(B::kMinNormal)));
  const __m512i dmask = _mm512_set1_epi32(int32_t(B::kDenormMask));
  const __m512i subnormal = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(mag), _mm512_castsi512_ps(dmask))),
      dmask);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, B::kMantShift), _mm512_set1_epi32(1));
  __m512i normal = _mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(B::kBiasAdd)), odd);
  normal = _mm512_srli_epi32(normal, B::kMantShift);
  __m512i r = _mm512_mask_blend_epi32(sub, normal, subnormal);
  r = _mm512_or_si512(r, _mm512_srli_epi32(sign, 24));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(r));
}
#endif

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
