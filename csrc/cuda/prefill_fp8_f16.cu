// paged_attention prefill kernels for float16 queries over fp8 (e4m3fn, e5m2) caches.
#include "cuda/attention_prefill.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_PREFILL(F16, E4M3)
PAGEDKV_INSTANTIATE_PREFILL(F16, E5M2)
}  // namespace pagedkv::cuda
