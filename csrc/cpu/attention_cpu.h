// The CPU attention kernel's arguments, work items and per-dtype entry points.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedkv::cpu {

// Raw pointers and strides for one paged_attention / paged_attention_lse call.
struct AttnArgs {
  const void* query;
  int64_t q_stride_tok, q_stride_head;
  void* out;  // contiguous [num_q_tokens, num_heads, head_size], query dtype
  float* lse;  // contiguous [num_q_tokens, num_heads], or nullptr: not wanted
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
  bool causal;  // false: every query row of a sequence sees all of its seq_len keys
  bool serial;  // small work: run on the calling thread, no OpenMP region
  int num_heads, num_kv_heads, head_size, block_size;
};

// The same arguments with the element types of one kernel instantiation.
template <typename q_t, typename cache_t>
struct TypedArgs : AttnArgs {
  explicit TypedArgs(const AttnArgs& a) : AttnArgs(a) {}
  const q_t* q() const { return static_cast<const q_t*>(query); }
  q_t* o() const { return static_cast<q_t*>(out); }
  const cache_t* k_cache() const { return static_cast<const cache_t*>(key_cache); }
  const cache_t* v_cache() const { return static_cast<const cache_t*>(value_cache); }
};

struct WorkItem {
  int32_t seq;
  int32_t kv_head_begin, kv_head_end;
  int32_t row_begin, row_end;  // relative to the sequence's first query row
};

enum class Fp8Kind { kE4m3, kE5m2 };  // the cache format of attention_fp8
enum class QueryKind { kFloat, kHalf, kBFloat16 };

// One entry point per translation unit (attention_*.cpp), so the template
// instantiations compile in parallel.
void attention_float(const AttnArgs& a, const std::vector<WorkItem>& items);
void attention_half(const AttnArgs& a, const std::vector<WorkItem>& items);
void attention_bfloat16(const AttnArgs& a, const std::vector<WorkItem>& items);
void attention_fp8(const AttnArgs& a, const std::vector<WorkItem>& items, QueryKind q,
                   Fp8Kind c);

}  // namespace pagedkv::cpu
