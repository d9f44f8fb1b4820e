#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace pagedkv {
namespace {

// The names users write in Python (torch.int64 rather than c10's "Long").
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case at::ScalarType::Float8_e5m2: return "float8_e5m2";
    default: return c10::toString(t);
  }
}

bool is_float_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_cache_dtype(at::ScalarType t) { return is_float_input(t) || is_fp8(t); }

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got ",
              t.dim(), "-D with shape ", t.sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d,
                const char* what, int64_t expected) {
  TORCH_CHECK(t.size(d) == expected, op, ": ", name, ".size(", d, ") (", what, ") must be ",
              expected, ", got ", t.size(d), " (shape ", t.sizes(), ")");
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " dtype must be ", dtype_name(expected),
              ", got ", dtype_name(t.scalar_type()));
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& d) {
  TORCH_CHECK(t.device() == d, op, ": ", name, " must be on ", d, " (the cache's device), got ",
              t.device());
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

CacheDims validate_caches(const char* op, const at::Tensor& key_cache,
                          const at::Tensor& value_cache) {
  check_dim(op, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_size]");
  TORCH_CHECK(is_cache_dtype(key_cache.scalar_type()), op,
              ": key_cache dtype must be float32, float16, bfloat16, float8_e4m3fn or "
              "float8_e5m2, got ",
              dtype_name(key_cache.scalar_type()));
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op,
              ": value_cache shape must equal key_cache shape ", key_cache.sizes(), ", got ",
              value_cache.sizes());
  check_dtype(op, "value_cache", value_cache, key_cache.scalar_type());
  check_device(op, "value_cache", value_cache, key_cache.device());
  check_contiguous(op, "key_cache", key_cache);
  check_contiguous(op, "value_cache", value_cache);
  CacheDims d{key_cache.size(0), key_cache.size(1), key_cache.size(2), key_cache.size(3)};
  TORCH_CHECK(d.block_size >= 1 && d.block_size <= 256, op,
              ": block_size (key_cache.size(1)) must be in [1, 256], got ", d.block_size);
  TORCH_CHECK(d.head_size >= 8 && d.head_size <= 512 && d.head_size % 8 == 0, op,
              ": head_size (key_cache.size(3)) must be a multiple of 8 in [8, 512], got ",
              d.head_size);
  TORCH_CHECK(d.num_kv_heads >= 1, op, ": num_kv_heads (key_cache.size(2)) must be >= 1, got ",
              d.num_kv_heads);
  return d;
}

void validate_scale(const char* op, const char* name, const std::optional<at::Tensor>& s,
                    const at::Device& device) {
  if (!s.has_value()) return;
  TORCH_CHECK(s->numel() == 1, op, ": ", name, " must have exactly 1 element, got ", s->numel(),
              " (shape ", s->sizes(), ")");
  check_dtype(op, name, *s, at::kFloat);
  check_device(op, name, *s, device);
}

// Input rows [num_tokens, num_heads, head_size] with unit stride in the last dim and
// head stride head_size; the token stride is free (views of a fused QKV projection).
void check_row_layout(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.stride(2) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(2)), op, ": ", name,
              " must have strides [*, ", t.size(2), ", 1] (head_size-contiguous heads), got ",
              t.strides());
}

}  // namespace

bool is_fp8(at::ScalarType t) {
  return t == at::ScalarType::Float8_e4m3fn || t == at::ScalarType::Float8_e5m2;
}

WriteDims validate_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& key_cache, const at::Tensor& value_cache,
                                     const at::Tensor& slot_mapping,
                                     const std::optional<at::Tensor>& k_scale,
                                     const std::optional<at::Tensor>& v_scale) {
  const char* op = "reshape_and_cache";
  CacheDims c = validate_caches(op, key_cache, value_cache);
  const at::Device dev = key_cache.device();
  check_dim(op, "key", key, 3, "[num_tokens, num_kv_heads, head_size]");
  check_size(op, "key", key, 1, "num_kv_heads", c.num_kv_heads);
  check_size(op, "key", key, 2, "head_size", c.head_size);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value shape must equal key shape ",
              key.sizes(), ", got ", value.sizes());
  TORCH_CHECK(is_float_input(key.scalar_type()), op,
              ": key dtype must be float32, float16 or bfloat16, got ", dtype_name(key.scalar_type()));
  check_dtype(op, "value", value, key.scalar_type());
  if (!is_fp8(key_cache.scalar_type())) {
    TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), op,
                ": key dtype must equal the cache dtype ", dtype_name(key_cache.scalar_type()),
                " (or the cache must be fp8), got ", dtype_name(key.scalar_type()));
  }
  check_device(op, "key", key, dev);
  check_device(op, "value", value, dev);
  check_row_layout(op, "key", key);
  check_row_layout(op, "value", value);
  check_dim(op, "slot_mapping", slot_mapping, 1, "[num_tokens]");
  check_dtype(op, "slot_mapping", slot_mapping, at::kLong);
  check_size(op, "slot_mapping", slot_mapping, 0, "num_tokens = key.size(0)", key.size(0));
  check_device(op, "slot_mapping", slot_mapping, dev);
  validate_scale(op, "k_scale", k_scale, dev);
  validate_scale(op, "v_scale", v_scale, dev);
  return WriteDims{c, key.size(0)};
}

AttentionDims validate_paged_attention(const char* op, const at::Tensor& query,
                                       const at::Tensor& key_cache, const at::Tensor& value_cache,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens,
                                       const at::Tensor& query_start_loc,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& v_scale) {
  CacheDims c = validate_caches(op, key_cache, value_cache);
  const at::Device dev = key_cache.device();
  check_dim(op, "query", query, 3, "[num_q_tokens, num_heads, head_size]");
  TORCH_CHECK(is_float_input(query.scalar_type()), op,
              ": query dtype must be float32, float16 or bfloat16, got ",
              dtype_name(query.scalar_type()));
  if (!is_fp8(key_cache.scalar_type())) {
    TORCH_CHECK(query.scalar_type() == key_cache.scalar_type(), op,
                ": query dtype must equal the cache dtype ", dtype_name(key_cache.scalar_type()),
                " (or the cache must be fp8), got ", dtype_name(query.scalar_type()));
  }
  check_size(op, "query", query, 2, "head_size = key_cache.size(3)", c.head_size);
  const int64_t num_heads = query.size(1);
  TORCH_CHECK(num_heads >= 1 && num_heads % c.num_kv_heads == 0, op,
              ": num_heads (query.size(1)) must be a positive multiple of num_kv_heads ",
              c.num_kv_heads, ", got ", num_heads);
  check_device(op, "query", query, dev);

  check_dim(op, "block_table", block_table, 2, "[num_seqs, max_blocks_per_seq]");
  check_dtype(op, "block_table", block_table, at::kInt);
  check_device(op, "block_table", block_table, dev);
  const int64_t num_seqs = block_table.size(0);
  check_dim(op, "seq_lens", seq_lens, 1, "[num_seqs]");
  check_dtype(op, "seq_lens", seq_lens, at::kInt);
  check_size(op, "seq_lens", seq_lens, 0, "num_seqs = block_table.size(0)", num_seqs);
  check_device(op, "seq_lens", seq_lens, dev);
  check_dim(op, "query_start_loc", query_start_loc, 1, "[num_seqs + 1]");
  check_dtype(op, "query_start_loc", query_start_loc, at::kInt);
  check_size(op, "query_start_loc", query_start_loc, 0, "num_seqs + 1", num_seqs + 1);
  check_device(op, "query_start_loc", query_start_loc, dev);
  if (alibi_slopes.has_value()) {
    check_dim(op, "alibi_slopes", *alibi_slopes, 1, "[num_heads]");
    check_dtype(op, "alibi_slopes", *alibi_slopes, at::kFloat);
    check_size(op, "alibi_slopes", *alibi_slopes, 0, "num_heads", num_heads);
    check_device(op, "alibi_slopes", *alibi_slopes, dev);
  }
  validate_scale(op, "k_scale", k_scale, dev);
  validate_scale(op, "v_scale", v_scale, dev);
  return AttentionDims{c, query.size(0), num_heads, num_seqs, block_table.size(1)};
}

AttentionDims validate_paged_attention_lse(const at::Tensor& query, const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& block_table,
                                           const at::Tensor& seq_lens,
                                           const at::Tensor& query_start_loc,
                                           const std::optional<at::Tensor>& alibi_slopes,
                                           int64_t sliding_window,
                                           const std::optional<at::Tensor>& k_scale,
                                           const std::optional<at::Tensor>& v_scale, bool causal) {
  const char* op = "paged_attention_lse";
  const AttentionDims d = validate_paged_attention(op, query, key_cache, value_cache, block_table,
                                                   seq_lens, query_start_loc, alibi_slopes,
                                                   k_scale, v_scale);
  if (!causal) {
    // Without causality a row has no position to measure a window or a distance from.
    TORCH_CHECK(sliding_window == -1, op, ": sliding_window must be -1 when causal=False, got ",
                sliding_window);
    TORCH_CHECK(!alibi_slopes.has_value(), op,
                ": alibi_slopes must be None when causal=False, got a tensor of shape ",
                alibi_slopes.has_value() ? alibi_slopes->sizes() : at::IntArrayRef{});
  }
  return d;
}

MergeDims validate_merge_attn_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                     const at::Tensor& out_b, const at::Tensor& lse_b) {
  const char* op = "merge_attn_states";
  check_dim(op, "out_a", out_a, 3, "[num_tokens, num_heads, head_size]");
  TORCH_CHECK(is_float_input(out_a.scalar_type()), op,
              ": out_a dtype must be float32, float16 or bfloat16, got ",
              dtype_name(out_a.scalar_type()));
  TORCH_CHECK(out_b.sizes() == out_a.sizes(), op, ": out_b shape must equal out_a shape ",
              out_a.sizes(), ", got ", out_b.sizes());
  TORCH_CHECK(is_float_input(out_b.scalar_type()), op,
              ": out_b dtype must be float32, float16 or bfloat16, got ",
              dtype_name(out_b.scalar_type()));
  const at::Device dev = out_a.device();
  for (auto [name, lse] : {std::pair<const char*, const at::Tensor*>{"lse_a", &lse_a},
                           std::pair<const char*, const at::Tensor*>{"lse_b", &lse_b}}) {
    check_dim(op, name, *lse, 2, "[num_tokens, num_heads]");
    check_size(op, name, *lse, 0, "num_tokens = out_a.size(0)", out_a.size(0));
    check_size(op, name, *lse, 1, "num_heads = out_a.size(1)", out_a.size(1));
    check_dtype(op, name, *lse, at::kFloat);
  }
  TORCH_CHECK(out_b.device() == dev, op, ": out_b must be on ", dev, " (out_a's device), got ",
              out_b.device());
  TORCH_CHECK(lse_a.device() == dev, op, ": lse_a must be on ", dev, " (out_a's device), got ",
              lse_a.device());
  TORCH_CHECK(lse_b.device() == dev, op, ": lse_b must be on ", dev, " (out_a's device), got ",
              lse_b.device());
  return MergeDims{out_a.size(0), out_a.size(1), out_a.size(2)};
}

int64_t validate_copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                             const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  TORCH_CHECK(key_caches.size() == value_caches.size(), op,
              ": value_caches must have as many layers as key_caches (", key_caches.size(),
              "), got ", value_caches.size());
  check_dim(op, "block_mapping", block_mapping, 2, "[num_pairs, 2] of (src, dst)");
  check_size(op, "block_mapping", block_mapping, 1, "(src, dst)", 2);
  check_dtype(op, "block_mapping", block_mapping, at::kLong);
  for (size_t i = 0; i < key_caches.size(); ++i) {
    const at::Tensor& k = key_caches[i];
    const at::Tensor& v = value_caches[i];
    TORCH_CHECK(k.dim() >= 2, op, ": key_caches[", i,
                "] must be [num_blocks, ...] with at least 2 dims, got shape ", k.sizes());
    TORCH_CHECK(v.sizes() == k.sizes(), op, ": value_caches[", i, "] shape must equal key_caches[",
                i, "] shape ", k.sizes(), ", got ", v.sizes());
    TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, ": value_caches[", i,
                "] dtype must equal key_caches[", i, "] dtype ", dtype_name(k.scalar_type()),
                ", got ", dtype_name(v.scalar_type()));
    TORCH_CHECK(k.device() == key_caches[0].device() && v.device() == key_caches[0].device(), op,
                ": every cache must be on ", key_caches[0].device(), ", got key_caches[", i,
                "] on ", k.device(), " and value_caches[", i, "] on ", v.device());
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), op, ": key_caches[", i,
                "] and value_caches[", i, "] must be contiguous");
  }
  return block_mapping.size(0);
}

int64_t validate_swap_blocks(const at::Tensor& src, const at::Tensor& dst,
                             const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  TORCH_CHECK(src.dim() >= 2, op, ": src must be [num_blocks, ...] with at least 2 dims, got shape ",
              src.sizes());
  TORCH_CHECK(dst.dim() == src.dim() && dst.sizes().slice(1) == src.sizes().slice(1), op,
              ": dst block shape must equal src block shape ", src.sizes().slice(1), ", got ",
              dst.sizes().slice(std::min<int64_t>(1, dst.dim())));
  check_dtype(op, "dst", dst, src.scalar_type());
  check_contiguous(op, "src", src);
  check_contiguous(op, "dst", dst);
  check_dim(op, "block_mapping", block_mapping, 2, "[num_pairs, 2] of (src, dst)");
  check_size(op, "block_mapping", block_mapping, 1, "(src, dst)", 2);
  check_dtype(op, "block_mapping", block_mapping, at::kLong);
  return block_mapping.size(0);
}

void check_slot_ranges(const at::Tensor& slot_mapping, int64_t num_slots) {
  const at::Tensor s = slot_mapping.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  const int64_t n = s.numel();
  std::vector<int64_t> used;
  used.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] < num_slots, "reshape_and_cache: slot_mapping[", i, "] must be < num_blocks * "
                "block_size = ", num_slots, " (or negative to skip), got ", p[i]);
    if (p[i] >= 0) used.push_back(p[i]);
  }
  std::sort(used.begin(), used.end());
  auto dup = std::adjacent_find(used.begin(), used.end());
  TORCH_CHECK(dup == used.end(), "reshape_and_cache: slot_mapping must hold distinct "
              "non-negative slots, got slot ", (dup == used.end() ? 0 : *dup), " more than once");
}

void check_attention_ranges(const char* op, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                            const AttentionDims& d, bool causal) {
  const at::Tensor bt = block_table.contiguous(), sl = seq_lens.contiguous(),
                   qsl = query_start_loc.contiguous();
  const int32_t* b = bt.data_ptr<int32_t>();
  const int32_t* s = sl.data_ptr<int32_t>();
  const int32_t* q = qsl.data_ptr<int32_t>();
  TORCH_CHECK(q[0] == 0, op, ": query_start_loc[0] must be 0, got ", q[0]);
  TORCH_CHECK(q[d.num_seqs] == d.num_q_tokens, op, ": query_start_loc[", d.num_seqs,
              "] must be num_q_tokens = ", d.num_q_tokens, ", got ", q[d.num_seqs]);
  for (int64_t i = 0; i < d.num_seqs; ++i) {
    const int64_t q_len = int64_t(q[i + 1]) - q[i];
    TORCH_CHECK(q_len >= 0, op, ": query_start_loc must be non-decreasing, got query_start_loc[",
                i, "] = ", q[i], " > query_start_loc[", i + 1, "] = ", q[i + 1]);
    if (causal) {
      TORCH_CHECK(s[i] >= q_len, op, ": seq_lens[", i, "] must be >= its query length ", q_len,
                  " (seq_lens counts the query tokens), got ", s[i]);
    } else {
      TORCH_CHECK(s[i] >= 0, op, ": seq_lens[", i, "] must be >= 0, got ", s[i]);
    }
    const int64_t blocks = (int64_t(s[i]) + d.cache.block_size - 1) / d.cache.block_size;
    TORCH_CHECK(blocks <= d.max_blocks_per_seq, op, ": seq_lens[", i, "] = ", s[i], " needs ",
                blocks, " blocks but block_table has ", d.max_blocks_per_seq, " columns");
    for (int64_t j = 0; j < blocks; ++j) {
      const int32_t blk = b[i * d.max_blocks_per_seq + j];
      TORCH_CHECK(blk >= 0 && blk < d.cache.num_blocks, op, ": block_table[", i, ", ", j,
                  "] must be in [0, num_blocks = ", d.cache.num_blocks, "), got ", blk);
    }
  }
}

void check_block_mapping_ranges(const char* op, const at::Tensor& block_mapping,
                                int64_t src_blocks, int64_t dst_blocks, bool in_place) {
  const at::Tensor m = block_mapping.contiguous();
  const int64_t* p = m.data_ptr<int64_t>();
  const int64_t n = m.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[2 * i] >= 0 && p[2 * i] < src_blocks, op, ": block_mapping[", i,
                ", 0] (src) must be in [0, ", src_blocks, "), got ", p[2 * i]);
    TORCH_CHECK(p[2 * i + 1] >= 0 && p[2 * i + 1] < dst_blocks, op, ": block_mapping[", i,
                ", 1] (dst) must be in [0, ", dst_blocks, "), got ", p[2 * i + 1]);
  }
  if (!in_place) return;
  // (block, pair index) of every destination, sorted: duplicates sit side by side and
  // each source is found by binary search.
  std::vector<std::pair<int64_t, int64_t>> dsts(n);
  for (int64_t i = 0; i < n; ++i) dsts[i] = {p[2 * i + 1], i};
  std::sort(dsts.begin(), dsts.end());
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(dsts[i].first != dsts[i - 1].first, op,
                ": block_mapping destinations must be distinct, got dst ", dsts[i].first,
                " in pairs ", dsts[i - 1].second, " and ", dsts[i].second);
  }
  for (int64_t i = 0; i < n; ++i) {
    const auto hit = std::lower_bound(dsts.begin(), dsts.end(),
                                      std::pair<int64_t, int64_t>{p[2 * i], -1});
    TORCH_CHECK(hit == dsts.end() || hit->first != p[2 * i], op,
                ": block_mapping must not use a block both as a source and as a destination "
                "(every copy reads the block as it was before the call), got block ",
                p[2 * i], " as src of pair ", i, " and dst of pair ",
                (hit == dsts.end() ? -1 : hit->second));
  }
}

}  // namespace pagedkv
