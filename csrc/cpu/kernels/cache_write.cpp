// reshape_and_cache's writes on CPU (validated by cache_ops.cpp): rows copied into their
// slots with streaming stores, or quantized to fp8 16 lanes at a time with AVX-512.
#include "cpu/isa.h"
#include "cpu/kernels/vec.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace pagedkv::cpu::PAGEDKV_ISA_NS {
namespace {

// One row of fp8 cache: x / scale quantized, 16 lanes at a time.
template <typename in_t, typename fp8_t>
inline void quantize_row(const in_t* x, fp8_t* y, int64_t row, float scale) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + kVec <= row; j += kVec) quantize_fp8_x16(load_vec(x + j), scale, y + j);
#endif
  for (; j < row; ++j) y[j] = quantize_fp8<fp8_t>(static_cast<float>(x[j]), scale);
}

// Copies one row into a cache slot with streaming stores when it is made of whole
// vectors at an aligned address (every row of a cache whose row is a multiple of 64
// bytes): a random slot is never in cache, and a plain store reads each line from
// memory before writing it, so streaming halves the traffic of the write.
inline void store_row(char* dst, const char* src, int64_t bytes) {
#if defined(CPU_CAPABILITY_AVX512)
  if (bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t b = 0; b < bytes; b += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + b), _mm512_loadu_si512(src + b));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (bytes % 32 == 0 && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    for (int64_t b = 0; b < bytes; b += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + b),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b)));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// The key and value rows of each token written together, in one OpenMP region per call
// (a region per cache doubled the fixed cost, and a region waits for a descheduled thread
// on a busy machine). Tokens are split in chunks of `grain`.
template <typename F>
void for_tokens(int64_t n, int64_t grain, const int64_t* slots, F&& write_token) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (slots[i] >= 0) write_token(i, slots[i]);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // streaming stores are weakly ordered: drain them before the op returns
#endif
  });
}

template <typename in_t, typename fp8_t>
void write_fp8_rows(const CacheWriteArgs& a) {
  const int64_t ks = a.key_stride / a.elem_size, vs = a.value_stride / a.elem_size;
  const in_t* k = reinterpret_cast<const in_t*>(a.key);
  const in_t* v = reinterpret_cast<const in_t*>(a.value);
  fp8_t* kc = reinterpret_cast<fp8_t*>(a.key_cache);
  fp8_t* vc = reinterpret_cast<fp8_t*>(a.value_cache);
  const int64_t row = a.row;
  for_tokens(a.num_tokens, 16, a.slots, [&](int64_t i, int64_t slot) {
    quantize_row(k + i * ks, kc + slot * row, row, a.k_scale);
    quantize_row(v + i * vs, vc + slot * row, row, a.v_scale);
  });
}

template <typename in_t>
void write_fp8(const CacheWriteArgs& a) {
  if (a.cache == CacheKind::kE4m3) write_fp8_rows<in_t, c10::Float8_e4m3fn>(a);
  else write_fp8_rows<in_t, c10::Float8_e5m2>(a);
}

}  // namespace

void write_cache(const CacheWriteArgs& a) {
  if (a.cache == CacheKind::kSame) {
    const int64_t bytes = a.row * a.elem_size;
    for_tokens(a.num_tokens, 32, a.slots, [&](int64_t i, int64_t slot) {
      store_row(a.key_cache + slot * bytes, a.key + i * a.key_stride, bytes);
      store_row(a.value_cache + slot * bytes, a.value + i * a.value_stride, bytes);
    });
    return;
  }
  switch (a.in) {  // the input dtype: float32, float16 or bfloat16 (validated)
    case QueryKind::kHalf: write_fp8<c10::Half>(a); break;
    case QueryKind::kBFloat16: write_fp8<c10::BFloat16>(a); break;
    default: write_fp8<float>(a); break;
  }
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
