// paged_attention decode kernels for float32 queries and caches.
#include "cuda/attention_decode.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_DECODE(F32, F32)
}  // namespace pagedkv::cuda
