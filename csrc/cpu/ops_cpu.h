// The CPU kernels' ATen entry points, registered in register_cpu.cpp.
#pragma once

#include "backend_ops.h"

#include <string>
#include <tuple>

namespace pagedkv::cpu {

PAGEDKV_DECLARE_BACKEND_OPS()

// The private op _cpu_attention_plan: the work plan paged_attention(_lse) would run for
// this batch under the current tiling knobs, as (work items, query-key products, whether
// it stays on the calling thread). Tests see the tiling knobs act through it.
std::tuple<int64_t, int64_t, bool> attention_plan(const at::Tensor& seq_lens,
                                                  const at::Tensor& query_start_loc,
                                                  int64_t num_heads, int64_t num_kv_heads,
                                                  int64_t sliding_window, bool causal);

}  // namespace pagedkv::cpu
