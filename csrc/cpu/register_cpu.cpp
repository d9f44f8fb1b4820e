// CPU kernels for the pagedkv ops (schemas in ops_catalog.cpp), and the CPU kernels'
// private ops (not in the public catalog: they report, they do not compute).
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/ops_cpu.h"

TORCH_LIBRARY_IMPL(pagedkv, CPU, m) {
  m.impl("reshape_and_cache", &pagedkv::cpu::reshape_and_cache);
  m.impl("paged_attention", &pagedkv::cpu::paged_attention);
  m.impl("paged_attention_lse", &pagedkv::cpu::paged_attention_lse);
  m.impl("merge_attn_states", &pagedkv::cpu::merge_attn_states);
  m.impl("copy_blocks", &pagedkv::cpu::copy_blocks);
  m.impl("swap_blocks", &pagedkv::cpu::swap_blocks);
  m.impl("_cpu_attention_plan", &pagedkv::cpu::attention_plan);
}

TORCH_LIBRARY_FRAGMENT(pagedkv, m) {
  // The CPU kernels' ISA variants as JSON: {"compiled": [...], "runnable": [...],
  // "active": "avx2"} (torch_pagedkv.knobs.cpu_isa_info; the knob cpu_isa picks).
  m.def("_cpu_isa_info() -> str");
  // The CPU attention plan of a batch: (work items, query-key products, serial).
  m.def("_cpu_attention_plan(Tensor seq_lens, Tensor query_start_loc, int num_heads, "
        "int num_kv_heads, int sliding_window, bool causal) -> (int, int, bool)");
}

// No tensor arguments, so no backend key: the dispatcher calls this kernel.
TORCH_LIBRARY_IMPL(pagedkv, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa_info", &pagedkv::cpu::isa_info);
}
