// The CPU attention kernel's arguments and work items (raw pointers: the ISA variants'
// kernels, cpu/kernels/, see no at::Tensor). Their entry points: cpu/isa.h.
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

struct WorkItem {
  int32_t seq;
  int32_t kv_head_begin, kv_head_end;
  int32_t row_begin, row_end;  // relative to the sequence's first query row
};

enum class Fp8Kind { kE4m3, kE5m2 };  // the cache format of attention_fp8
enum class QueryKind { kFloat, kHalf, kBFloat16 };

}  // namespace pagedkv::cpu
