// reshape_and_cache, copy_blocks and swap_blocks, CPU backend.
// Every check (index ranges included) runs before the first write.
#include "checks.h"
#include "cpu/ops_cpu.h"
#include "cpu/vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace pagedkv::cpu {
namespace {

void check_on_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on cpu for the CPU kernel, got ",
              t.device());
}

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
void write_fp8_rows(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const int64_t* slots, float k_scale, float v_scale) {
  const int64_t row = key.size(1) * key.size(2);
  const int64_t ks = key.stride(0), vs = value.stride(0);
  const in_t* k = key.data_ptr<in_t>();
  const in_t* v = value.data_ptr<in_t>();
  fp8_t* kc = reinterpret_cast<fp8_t*>(key_cache.data_ptr());
  fp8_t* vc = reinterpret_cast<fp8_t*>(value_cache.data_ptr());
  for_tokens(key.size(0), 16, slots, [&](int64_t i, int64_t slot) {
    quantize_row(k + i * ks, kc + slot * row, row, k_scale);
    quantize_row(v + i * vs, vc + slot * row, row, v_scale);
  });
}

float scale_of(const std::optional<at::Tensor>& t) { return t.has_value() ? t->item<float>() : 1.f; }

void write_rows(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                at::Tensor& value_cache, const int64_t* slots,
                const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const int64_t n = key.size(0);
  if (!is_fp8(key_cache.scalar_type())) {
    const int64_t bytes = key.size(1) * key.size(2) * key.element_size();
    const int64_t ks = key.stride(0) * key.element_size(), vs = value.stride(0) * value.element_size();
    const char* k = static_cast<const char*>(key.data_ptr());
    const char* v = static_cast<const char*>(value.data_ptr());
    char* kc = static_cast<char*>(key_cache.data_ptr());
    char* vc = static_cast<char*>(value_cache.data_ptr());
    for_tokens(n, 32, slots, [&](int64_t i, int64_t slot) {
      store_row(kc + slot * bytes, k + i * ks, bytes);
      store_row(vc + slot * bytes, v + i * vs, bytes);
    });
    return;
  }
  const float ksc = scale_of(k_scale), vsc = scale_of(v_scale);
  const bool e4m3 = key_cache.scalar_type() == at::ScalarType::Float8_e4m3fn;
  auto run = [&](auto in) {  // the input dtype: float32, float16 or bfloat16 (validated)
    using in_t = decltype(in);
    if (e4m3) write_fp8_rows<in_t, c10::Float8_e4m3fn>(key, value, key_cache, value_cache, slots, ksc, vsc);
    else write_fp8_rows<in_t, c10::Float8_e5m2>(key, value, key_cache, value_cache, slots, ksc, vsc);
  };
  switch (key.scalar_type()) {
    case at::kHalf: run(c10::Half{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(float{}); break;
  }
}

// Copies (src, dst) block pairs from one contiguous cache to another.
void copy_block_pairs(const at::Tensor& from, at::Tensor& to, const int64_t* pairs, int64_t n) {
  const int64_t bytes = from.numel() / std::max<int64_t>(from.size(0), 1) * from.element_size();
  const char* s = static_cast<const char*>(from.data_ptr());
  char* d = static_cast<char*>(to.data_ptr());
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      std::memcpy(d + pairs[2 * i + 1] * bytes, s + pairs[2 * i] * bytes, bytes);
  });
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale) {
  const WriteDims d = validate_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                                 k_scale, v_scale);
  check_slot_ranges(slot_mapping, d.cache.num_blocks * d.cache.block_size);
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  write_rows(key, value, key_cache, value_cache, s, k_scale, v_scale);
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  const int64_t n = validate_copy_blocks(key_caches, value_caches, block_mapping);
  check_on_cpu(op, "block_mapping", block_mapping);
  // Every layer must hold the ids, so the smallest layer bounds them: one pass for all.
  int64_t num_blocks = std::numeric_limits<int64_t>::max();
  for (const at::Tensor& k : key_caches) {
    check_on_cpu(op, "key_caches", k);
    num_blocks = std::min(num_blocks, k.size(0));
  }
  if (!key_caches.empty()) {
    check_block_mapping_ranges(op, block_mapping, num_blocks, num_blocks, /*in_place=*/true);
  }
  if (n == 0) return;
  const at::Tensor m = block_mapping.contiguous();
  for (size_t l = 0; l < key_caches.size(); ++l) {
    at::Tensor k = key_caches[l], v = value_caches[l];
    copy_block_pairs(k, k, m.data_ptr<int64_t>(), n);
    copy_block_pairs(v, v, m.data_ptr<int64_t>(), n);
  }
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  const int64_t n = validate_swap_blocks(src, dst, block_mapping);
  check_on_cpu(op, "src", src);
  check_on_cpu(op, "dst", dst);
  check_on_cpu(op, "block_mapping", block_mapping);
  check_block_mapping_ranges(op, block_mapping, src.size(0), dst.size(0),
                             /*in_place=*/src.is_alias_of(dst));
  if (n == 0) return;
  const at::Tensor m = block_mapping.contiguous();
  copy_block_pairs(src, dst, m.data_ptr<int64_t>(), n);
}

}  // namespace pagedkv::cpu
