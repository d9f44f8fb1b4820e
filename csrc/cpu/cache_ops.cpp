// reshape_and_cache, copy_blocks and swap_blocks, CPU backend.
// Every check (index ranges included) runs before the first write.
#include "checks.h"
#include "cpu/ops_cpu.h"
#include "cpu/isa.h"

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

QueryKind dtype_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return QueryKind::kHalf;
    case at::kBFloat16: return QueryKind::kBFloat16;
    default: return QueryKind::kFloat;
  }
}

float scale_of(const std::optional<at::Tensor>& t) { return t.has_value() ? t->item<float>() : 1.f; }

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
  const at::ScalarType c = key_cache.scalar_type();
  CacheWriteArgs a;
  a.key = static_cast<const char*>(key.data_ptr());
  a.value = static_cast<const char*>(value.data_ptr());
  a.key_stride = key.stride(0) * key.element_size();
  a.value_stride = value.stride(0) * value.element_size();
  a.key_cache = static_cast<char*>(key_cache.data_ptr());
  a.value_cache = static_cast<char*>(value_cache.data_ptr());
  a.slots = slots.data_ptr<int64_t>();
  a.num_tokens = key.size(0);
  a.row = key.size(1) * key.size(2);
  a.elem_size = key.element_size();
  a.in = dtype_kind(key.scalar_type());
  a.cache = !is_fp8(c) ? CacheKind::kSame
            : c == at::ScalarType::Float8_e4m3fn ? CacheKind::kE4m3 : CacheKind::kE5m2;
  a.k_scale = a.cache == CacheKind::kSame ? 1.f : scale_of(k_scale);
  a.v_scale = a.cache == CacheKind::kSame ? 1.f : scale_of(v_scale);
  kernels().write_cache(a);
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
