// paged_attention on CPU, c10::Half query and cache (one translation unit per dtype, so the
// specialized kernels compile in parallel).
#include "cpu/attention_kernel.h"

namespace pagedkv::cpu {

void attention_half(const AttnArgs& raw, const std::vector<WorkItem>& items, bool generic) {
  attention_same_dtype<c10::Half>(raw, items, generic);
}

}  // namespace pagedkv::cpu
