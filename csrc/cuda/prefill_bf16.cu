// paged_attention prefill kernels for bfloat16 queries and caches.
#include "cuda/attention_prefill.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_PREFILL(BF16, BF16)
}  // namespace pagedkv::cuda
