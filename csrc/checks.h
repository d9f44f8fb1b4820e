// Argument validation shared by the CPU and CUDA backends.
//
// Every failed check raises RuntimeError naming the argument and the expected vs
// actual value, before anything is written. validate_* run host-side checks of
// shapes, dtypes, devices and strides (cheap, no data reads). check_*_ranges read the
// index tensors, so they need them on the CPU: the CPU kernels always run them, the
// CUDA glue only in debug mode (knobs.h), on host copies.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace pagedkv {

bool is_fp8(at::ScalarType t);

struct CacheDims {
  int64_t num_blocks, block_size, num_kv_heads, head_size;
};

struct WriteDims {
  CacheDims cache;
  int64_t num_tokens;
};

struct AttentionDims {
  CacheDims cache;
  int64_t num_q_tokens, num_heads, num_seqs, max_blocks_per_seq;
};

WriteDims validate_reshape_and_cache(const at::Tensor& key, const at::Tensor& value,
                                     const at::Tensor& key_cache, const at::Tensor& value_cache,
                                     const at::Tensor& slot_mapping,
                                     const std::optional<at::Tensor>& k_scale,
                                     const std::optional<at::Tensor>& v_scale);

// `op` names the caller in messages: paged_attention or paged_attention_lse.
AttentionDims validate_paged_attention(const char* op, const at::Tensor& query,
                                       const at::Tensor& key_cache, const at::Tensor& value_cache,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens,
                                       const at::Tensor& query_start_loc,
                                       const std::optional<at::Tensor>& alibi_slopes,
                                       const std::optional<at::Tensor>& k_scale,
                                       const std::optional<at::Tensor>& v_scale);
// paged_attention_lse: the checks above, plus causal=False only without a window or ALiBi.
AttentionDims validate_paged_attention_lse(const at::Tensor& query, const at::Tensor& key_cache,
                                           const at::Tensor& value_cache,
                                           const at::Tensor& block_table,
                                           const at::Tensor& seq_lens,
                                           const at::Tensor& query_start_loc,
                                           const std::optional<at::Tensor>& alibi_slopes,
                                           int64_t sliding_window,
                                           const std::optional<at::Tensor>& k_scale,
                                           const std::optional<at::Tensor>& v_scale, bool causal);

struct MergeDims {
  int64_t num_tokens, num_heads, head_size;
};
MergeDims validate_merge_attn_states(const at::Tensor& out_a, const at::Tensor& lse_a,
                                     const at::Tensor& out_b, const at::Tensor& lse_b);

// Returns the number of (src, dst) pairs.
int64_t validate_copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                             const at::Tensor& block_mapping);
int64_t validate_swap_blocks(const at::Tensor& src, const at::Tensor& dst,
                             const at::Tensor& block_mapping);

// Index-range checks over CPU tensors (see above).
void check_slot_ranges(const at::Tensor& slot_mapping, int64_t num_slots);
// causal=False lifts the rule q_len <= seq_len (a shared-prefix pass has more query rows
// than keys).
void check_attention_ranges(const char* op, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                            const AttentionDims& dims, bool causal = true);
// Every src < src_blocks, every dst < dst_blocks, no negative entry. With in_place (the
// pairs copy within one tensor: copy_blocks, or swap_blocks with src aliasing dst) also
// no destination twice and no block both a source and a destination, so every copy reads
// the contents from before the call and the pairs may run in any order, in parallel.
void check_block_mapping_ranges(const char* op, const at::Tensor& block_mapping,
                                int64_t src_blocks, int64_t dst_blocks, bool in_place);

}  // namespace pagedkv
