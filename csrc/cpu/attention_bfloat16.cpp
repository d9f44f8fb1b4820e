// paged_attention on CPU, c10::BFloat16 query and cache: specialized head/block sizes + generic.
#include "cpu/attention_kernel.h"
#include "dispatch.h"

namespace pagedkv::cpu {

void attention_bfloat16(const AttnArgs& raw, const std::vector<WorkItem>& items, bool generic) {
  const TypedArgs<c10::BFloat16, c10::BFloat16> a(raw);
  dispatch_shape(a.head_size, a.block_size, generic, [&](auto head, auto block) {
    attention_cpu<c10::BFloat16, c10::BFloat16, decltype(head)::value, decltype(block)::value>(a, items);
  });
}

}  // namespace pagedkv::cpu
