// CUDA kernels for the pagedkv ops (schemas in ops_catalog.cpp).
//
// swap_blocks is registered for CUDA only: the dispatcher picks the CUDA kernel when any
// tensor argument is on CUDA, so a GPU <-> CPU swap lands here and a CPU <-> CPU one on
// the CPU kernel.
#include <torch/library.h>

#include "ops_namespace.h"
#include "cuda/ops_cuda.h"

// The dispatch key: CUDA, or CPU for the SIMT-emulated library (its device is the CPU).
#ifndef PAGEDKV_DEVICE_KEY
#define PAGEDKV_DEVICE_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(PAGEDKV_OPS_NS, PAGEDKV_DEVICE_KEY, m) {
  m.impl("reshape_and_cache", &pagedkv::cuda::reshape_and_cache);
  m.impl("paged_attention", &pagedkv::cuda::paged_attention);
  m.impl("paged_attention_lse", &pagedkv::cuda::paged_attention_lse);
  m.impl("merge_attn_states", &pagedkv::cuda::merge_attn_states);
  m.impl("copy_blocks", &pagedkv::cuda::copy_blocks);
  m.impl("swap_blocks", &pagedkv::cuda::swap_blocks);
}
