// paged_attention on CPU over fp8 caches (e4m3fn, e5m2) with any float query dtype.
// Like every CPU dtype, fp8 runs the kernel that reads the head and block size at run time.
#include "cpu/attention_kernel.h"

namespace pagedkv::cpu {
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

const float* fp8_table(bool e4m3) {
  static const auto tables = [] {
    std::vector<float> t(512);
    for (int i = 0; i < 256; ++i) {
      t[i] = static_cast<float>(c10::Float8_e4m3fn(uint8_t(i), c10::Float8_e4m3fn::from_bits()));
      t[256 + i] = static_cast<float>(c10::Float8_e5m2(uint8_t(i), c10::Float8_e5m2::from_bits()));
    }
    return t;
  }();
  return tables.data() + (e4m3 ? 0 : 256);
}

void attention_fp8(const AttnArgs& raw, const std::vector<WorkItem>& items, QueryKind q,
                   Fp8Kind c) {
  switch (q) {
    case QueryKind::kFloat: run_fp8<float>(raw, items, c); break;
    case QueryKind::kHalf: run_fp8<c10::Half>(raw, items, c); break;
    case QueryKind::kBFloat16: run_fp8<c10::BFloat16>(raw, items, c); break;
  }
}

}  // namespace pagedkv::cpu
