// The op catalog: every public torch.ops.pagedkv schema, in one place (docs/design.md §2).
// Backends register kernels with TORCH_LIBRARY_IMPL in their own files
// (cpu/register_cpu.cpp, cuda/register_cuda.cpp); fake impls live in torch_pagedkv/ops.py.
// Private ops (a leading underscore: runtime switches, launch configs) are not part of it:
// TORCH_LIBRARY_FRAGMENT blocks in private_ops.cpp and cuda/private_ops.cpp define them.
#include <torch/library.h>

#include "ops_namespace.h"

TORCH_LIBRARY(PAGEDKV_OPS_NS, m) {
  // Write the new tokens' K/V into the paged cache at slot_mapping (negative slot = skip).
  // fp8 caches store round_to_fp8(x / scale), saturated.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, Tensor slot_mapping, Tensor? k_scale=None, "
      "Tensor? v_scale=None) -> ()");
  // Causal attention of query rows over each sequence's paged K/V: decode, prefill,
  // chunked prefill, prefill over a cached prefix and mixed batches, one op.
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, float scale, "
      "Tensor? alibi_slopes=None, int sliding_window=-1, float softcap=0.0, "
      "Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  // paged_attention that also returns each row's log-sum-exp of scores (float32
  // [num_q_tokens, num_heads]; -inf where a row saw no key). causal=False: every row of
  // sequence i sees all seq_lens[i] keys, the shared-prefix pass of cascade attention.
  m.def(
      "paged_attention_lse(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, float scale, "
      "Tensor? alibi_slopes=None, int sliding_window=-1, float softcap=0.0, "
      "Tensor? k_scale=None, Tensor? v_scale=None, bool causal=True) "
      "-> (Tensor out, Tensor lse)");
  // Combine two partial attentions of the same rows over disjoint key sets by their lse.
  m.def(
      "merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
      "-> (Tensor out, Tensor lse)");
  // Copy block src -> dst in every layer's key and value caches (copy-on-write, fork).
  m.def(
      "copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor block_mapping) -> ()");
  // Copy blocks between two caches of the same block shape, possibly on different
  // devices (GPU cache <-> pinned CPU cache, for preemption by swapping).
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");
}
