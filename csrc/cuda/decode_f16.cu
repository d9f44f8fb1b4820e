// paged_attention decode kernels for float16 queries and caches.
#include "cuda/attention_decode.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_DECODE(F16, F16)
}  // namespace pagedkv::cuda
