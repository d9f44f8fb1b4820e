// paged_attention on CPU, float query and cache (one translation unit per dtype, so the
// dtypes compile in parallel).
#include "cpu/attention_kernel.h"

namespace pagedkv::cpu {

void attention_float(const AttnArgs& raw, const std::vector<WorkItem>& items) {
  attention_same_dtype<float>(raw, items);
}

}  // namespace pagedkv::cpu
