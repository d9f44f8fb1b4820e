// CPU kernels for the pagedkv ops (schemas in ops_catalog.cpp).
#include <torch/library.h>

#include "cpu/ops_cpu.h"

TORCH_LIBRARY_IMPL(pagedkv, CPU, m) {
  m.impl("reshape_and_cache", &pagedkv::cpu::reshape_and_cache);
  m.impl("paged_attention", &pagedkv::cpu::paged_attention);
  m.impl("paged_attention_lse", &pagedkv::cpu::paged_attention_lse);
  m.impl("merge_attn_states", &pagedkv::cpu::merge_attn_states);
  m.impl("copy_blocks", &pagedkv::cpu::copy_blocks);
  m.impl("swap_blocks", &pagedkv::cpu::swap_blocks);
}
