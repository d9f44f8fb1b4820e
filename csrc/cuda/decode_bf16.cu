// paged_attention decode kernels for bfloat16 queries and caches.
#include "cuda/attention_decode.cuh"

namespace pagedkv::cuda {
PAGEDKV_INSTANTIATE_DECODE(BF16, BF16)
}  // namespace pagedkv::cuda
