// paged_attention prefill kernels for float16 queries and caches.
#include "cuda/attention_prefill.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_PREFILL(F16, F16)
}  // namespace pagedkv::cuda
