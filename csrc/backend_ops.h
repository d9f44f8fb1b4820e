// The ATen signatures every backend implements for the ops of ops_catalog.cpp; a backend
// header expands PAGEDKV_DECLARE_BACKEND_OPS() inside its own namespace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#define PAGEDKV_DECLARE_BACKEND_OPS()                                                        \
  void reshape_and_cache(const at::Tensor& key, const at::Tensor& value,                     \
                         at::Tensor& key_cache, at::Tensor& value_cache,                     \
                         const at::Tensor& slot_mapping,                                     \
                         const std::optional<at::Tensor>& k_scale,                           \
                         const std::optional<at::Tensor>& v_scale);                          \
  at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,           \
                             const at::Tensor& value_cache, const at::Tensor& block_table,   \
                             const at::Tensor& seq_lens, const at::Tensor& query_start_loc,  \
                             double scale, const std::optional<at::Tensor>& alibi_slopes,    \
                             int64_t sliding_window, double softcap,                         \
                             const std::optional<at::Tensor>& k_scale,                       \
                             const std::optional<at::Tensor>& v_scale);                      \
  std::tuple<at::Tensor, at::Tensor> paged_attention_lse(                                    \
      const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,   \
      const at::Tensor& block_table, const at::Tensor& seq_lens,                             \
      const at::Tensor& query_start_loc, double scale,                                       \
      const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window, double softcap, \
      const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,    \
      bool causal);                                                                          \
  std::tuple<at::Tensor, at::Tensor> merge_attn_states(                                      \
      const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,             \
      const at::Tensor& lse_b);                                                              \
  void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,                   \
                   const at::Tensor& block_mapping);                                         \
  void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping);
