// The CPU attention kernel's arguments, work items and per-dtype entry points.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedkv::cpu {

// Raw pointers and strides for one paged_attention call (element types are set by
// the typed view TypedArgs below).
struct AttnArgsRaw {
  const void* query;
  int64_t q_stride_tok, q_stride_head;
  void* out;  // contiguous [num_q_tokens, num_heads, head_size], query dtype
  const void* key_cache;
  const void* value_cache;
  int64_t cache_stride_tok;  // num_kv_heads * head_size; a block is block_size of these
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  const float* alibi_slopes;  // nullptr: no ALiBi
  float scale, softcap, k_scale, v_scale;
  int64_t sliding_window;
  int num_heads, num_kv_heads, head_size, block_size;
};

template <typename q_t, typename cache_t>
struct TypedArgs {
  const q_t* query;
  int64_t q_stride_tok, q_stride_head;
  q_t* out;
  const cache_t* key_cache;
  const cache_t* value_cache;
  int64_t cache_stride_tok;
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  const int32_t* query_start_loc;
  const float* alibi_slopes;
  float scale, softcap, k_scale, v_scale;
  int64_t sliding_window;
  int num_heads, num_kv_heads, head_size, block_size;

  explicit TypedArgs(const AttnArgsRaw& r)
      : query(static_cast<const q_t*>(r.query)), q_stride_tok(r.q_stride_tok),
        q_stride_head(r.q_stride_head), out(static_cast<q_t*>(r.out)),
        key_cache(static_cast<const cache_t*>(r.key_cache)),
        value_cache(static_cast<const cache_t*>(r.value_cache)),
        cache_stride_tok(r.cache_stride_tok), block_table(r.block_table),
        block_table_stride(r.block_table_stride), seq_lens(r.seq_lens),
        query_start_loc(r.query_start_loc), alibi_slopes(r.alibi_slopes), scale(r.scale),
        softcap(r.softcap), k_scale(r.k_scale), v_scale(r.v_scale),
        sliding_window(r.sliding_window), num_heads(r.num_heads), num_kv_heads(r.num_kv_heads),
        head_size(r.head_size), block_size(r.block_size) {}
};

struct WorkItem {
  int32_t seq;
  int32_t kv_head_begin, kv_head_end;
  int32_t row_begin, row_end;  // relative to the sequence's first query row
};

enum class CacheKind { kSame, kFp8E4m3, kFp8E5m2 };
enum class QueryKind { kFloat, kHalf, kBFloat16 };

// One entry point per translation unit (attention_*.cpp), so the template
// instantiations compile in parallel.
void attention_float(const AttnArgsRaw& a, const std::vector<WorkItem>& items, bool generic);
void attention_half(const AttnArgsRaw& a, const std::vector<WorkItem>& items, bool generic);
void attention_bfloat16(const AttnArgsRaw& a, const std::vector<WorkItem>& items, bool generic);
void attention_fp8(const AttnArgsRaw& a, const std::vector<WorkItem>& items, QueryKind q,
                   CacheKind c);

}  // namespace pagedkv::cpu
