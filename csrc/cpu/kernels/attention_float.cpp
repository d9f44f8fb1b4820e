// paged_attention on CPU, float query and cache (one translation unit per dtype, so the
// dtypes compile in parallel).
#include "cpu/isa.h"
#include "cpu/kernels/attention_kernel.h"

namespace pagedkv::cpu::PAGEDKV_ISA_NS {

void attention_float(const AttnArgs& raw, const std::vector<WorkItem>& items) {
  attention_same_dtype<float>(raw, items);
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
