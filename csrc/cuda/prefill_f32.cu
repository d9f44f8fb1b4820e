// paged_attention prefill kernels for float32 queries and caches.
#include "cuda/attention_prefill.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_PREFILL(F32, F32)
}  // namespace pagedkv::cuda
