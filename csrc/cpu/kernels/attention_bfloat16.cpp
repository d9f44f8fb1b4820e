// paged_attention on CPU, c10::BFloat16 query and cache (one translation unit per dtype, so the
// dtypes compile in parallel).
#include "cpu/isa.h"
#include "cpu/kernels/attention_kernel.h"

namespace pagedkv::cpu::PAGEDKV_ISA_NS {

void attention_bfloat16(const AttnArgs& raw, const std::vector<WorkItem>& items) {
  attention_same_dtype<c10::BFloat16>(raw, items);
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
