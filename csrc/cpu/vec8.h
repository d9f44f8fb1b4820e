// 8-float vectors for the CPU kernels: loads that widen any cache dtype to float32
// in registers, a horizontal sum, and an fp32 -> fp8 saturating quantizer.
// Built on at::vec::Vectorized<float> (AVX2 when CPU_CAPABILITY_AVX2 is defined,
// portable scalar code otherwise).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pagedkv::cpu {

using Vec = at::vec::Vectorized<float>;
static_assert(Vec::size() == 8, "the CPU kernels are written for 8-float vectors");
constexpr int kVec = 8;

// Lookup tables fp8 byte -> float (256 entries), built once.
const float* fp8_table(bool e4m3);

inline Vec load8(const float* p) { return Vec::loadu(p); }

inline Vec load8(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)));
#else
  float t[kVec];
  for (int i = 0; i < kVec; ++i) t[i] = static_cast<float>(p[i]);
  return Vec::loadu(t);
#endif
}

inline Vec load8(const c10::Half* p) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  float t[kVec];
  for (int i = 0; i < kVec; ++i) t[i] = static_cast<float>(p[i]);
  return Vec::loadu(t);
#endif
}

template <typename fp8_t>
inline Vec load8_fp8(const fp8_t* p, const float* table) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(bytes), 4));
#else
  float t[kVec];
  const uint8_t* b = reinterpret_cast<const uint8_t*>(p);
  for (int i = 0; i < kVec; ++i) t[i] = table[b[i]];
  return Vec::loadu(t);
#endif
}

// Loader for one cache dtype: holds the fp8 table pointer when it needs one.
template <typename T>
struct Loader {
  Vec operator()(const T* p) const { return load8(p); }
};
template <>
struct Loader<c10::Float8_e4m3fn> {
  const float* table = fp8_table(true);
  Vec operator()(const c10::Float8_e4m3fn* p) const { return load8_fp8(p, table); }
};
template <>
struct Loader<c10::Float8_e5m2> {
  const float* table = fp8_table(false);
  Vec operator()(const c10::Float8_e5m2* p) const { return load8_fp8(p, table); }
};

inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
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

// fp32 -> fp8: round_to_fp8(x / scale), saturated to the finite range, NaN stored as 0
// (an fp8 cache never holds inf or NaN).
template <typename fp8_t>
inline fp8_t quantize_fp8(float x, float scale) {
  const float kMax = static_cast<float>(std::numeric_limits<fp8_t>::max());
  float y = x / scale;
  y = std::isnan(y) ? 0.f : std::fmin(std::fmax(y, -kMax), kMax);
  return fp8_t(y);
}

}  // namespace pagedkv::cpu
