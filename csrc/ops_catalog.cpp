// The op catalog: every torch.ops.pagedkv schema, in one place (docs/design.md §2).
// Backends register kernels with TORCH_LIBRARY_IMPL in their own files
// (cpu/register_cpu.cpp, cuda/register_cuda.cpp); fake impls live in torch_pagedkv/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pagedkv, m) {
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
  // Copy block src -> dst in every layer's key and value caches (copy-on-write, fork).
  m.def(
      "copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, "
      "Tensor block_mapping) -> ()");
  // Copy blocks between two caches of the same block shape, possibly on different
  // devices (GPU cache <-> pinned CPU cache, for preemption by swapping).
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, Tensor block_mapping) -> ()");
  // Private (CUDA builds; torch_pagedkv/tuning): set one launch-config entry for a GPU name.
  m.def(
      "_set_launch_config(str device_name, int head_size, str dtype, int block_size, "
      "int decode_threads, int partition_size, int prefill_threads, int write_threads) -> ()");
  // Private: drop every launch-config entry, so launches fall back to the heuristic.
  m.def("_clear_launch_configs() -> ()");
  // Private: [decode_threads, partition_size, prefill_threads, write_threads, from_table] a launch uses.
  m.def("_launch_config(str device_name, int head_size, str dtype, int block_size) -> int[]");
  // Private: CUDA occupancy of one kernel config on the current GPU (pagedkv occupancy).
  m.def(
      "_occupancy(str kernel, str query_dtype, str cache_dtype, int head_size, int num_heads, "
      "int num_kv_heads, int threads, int partition_size) -> int[]");
}
