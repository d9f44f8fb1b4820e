// paged_attention on CPU, float query and cache: specialized head/block sizes + generic.
#include "cpu/attention_kernel.h"
#include "dispatch.h"

namespace pagedkv::cpu {

void attention_float(const AttnArgs& raw, const std::vector<WorkItem>& items, bool generic) {
  const TypedArgs<float, float> a(raw);
  dispatch_shape(a.head_size, a.block_size, generic, [&](auto head, auto block) {
    attention_cpu<float, float, decltype(head)::value, decltype(block)::value>(a, items);
  });
}

}  // namespace pagedkv::cpu
