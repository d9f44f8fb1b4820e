// paged_attention on CPU over fp8 caches (e4m3fn, e5m2) with any float query dtype.
// Like every CPU dtype, fp8 runs the kernel that reads the head and block size at run time.
#include "cpu/isa.h"
#include "cpu/kernels/attention_kernel.h"

namespace pagedkv::cpu::PAGEDKV_ISA_NS {
namespace {

template <typename q_t>
void run_fp8(const AttnArgs& raw, const std::vector<WorkItem>& items, Fp8Kind c) {
  if (c == Fp8Kind::kE4m3) {
    attention_cpu<q_t, c10::Float8_e4m3fn>(TypedArgs<q_t, c10::Float8_e4m3fn>(raw), items);
  } else {
    attention_cpu<q_t, c10::Float8_e5m2>(TypedArgs<q_t, c10::Float8_e5m2>(raw), items);
  }
}

}  // namespace

void attention_fp8(const AttnArgs& raw, const std::vector<WorkItem>& items, QueryKind q,
                   Fp8Kind c) {
  switch (q) {
    case QueryKind::kFloat: run_fp8<float>(raw, items, c); break;
    case QueryKind::kHalf: run_fp8<c10::Half>(raw, items, c); break;
    case QueryKind::kBFloat16: run_fp8<c10::BFloat16>(raw, items, c); break;
  }
}

}  // namespace pagedkv::cpu::PAGEDKV_ISA_NS
