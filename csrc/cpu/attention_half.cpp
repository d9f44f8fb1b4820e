// paged_attention on CPU, c10::Half query and cache: specialized head/block sizes + generic.
#include "cpu/attention_kernel.h"
#include "dispatch.h"

namespace pagedkv::cpu {

void attention_half(const AttnArgs& raw, const std::vector<WorkItem>& items, bool generic) {
  const TypedArgs<c10::Half, c10::Half> a(raw);
  dispatch_shape(a.head_size, a.block_size, generic, [&](auto head, auto block) {
    attention_cpu<c10::Half, c10::Half, decltype(head)::value, decltype(block)::value>(a, items);
  });
}

}  // namespace pagedkv::cpu
