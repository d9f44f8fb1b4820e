// merge_attn_states, CPU backend: combine two partial attentions of the same rows over
// disjoint key sets by their log-sum-exps (docs/design.md §2), one (token, head) row at a
// time over at::parallel_for.
#include "checks.h"
#include "cpu/ops_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace pagedkv::cpu {
namespace {

template <typename a_t, typename b_t>
void merge_rows(const a_t* out_a, const float* lse_a, const b_t* out_b, const float* lse_b,
                a_t* out, float* lse, int64_t rows, int64_t D) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float la = lse_a[r], lb = lse_b[r];
      const float m = std::max(la, lb);
      a_t* o = out + r * D;
      if (m == kNegInf) {  // neither part saw a key
        std::fill(o, o + D, static_cast<a_t>(0.f));
        lse[r] = kNegInf;
        continue;
      }
      const float wa = std::exp(la - m), wb = std::exp(lb - m), w = wa + wb;
      const a_t* xa = out_a + r * D;
      const b_t* xb = out_b + r * D;
      for (int64_t d = 0; d < D; ++d) {
        o[d] = static_cast<a_t>((wa * static_cast<float>(xa[d]) + wb * static_cast<float>(xb[d])) / w);
      }
      lse[r] = m + std::log(w);
    }
  });
}

// Runs f(T{}) for the element type of a float32/float16/bfloat16 tensor.
template <typename F>
void with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attn_states(const at::Tensor& out_a,
                                                     const at::Tensor& lse_a,
                                                     const at::Tensor& out_b,
                                                     const at::Tensor& lse_b) {
  const MergeDims d = validate_merge_attn_states(out_a, lse_a, out_b, lse_b);
  const at::Tensor oa = out_a.contiguous(), ob = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty({d.num_tokens, d.num_heads, d.head_size}, oa.options());
  at::Tensor lse = at::empty({d.num_tokens, d.num_heads}, la.options());
  const int64_t rows = d.num_tokens * d.num_heads;
  if (rows == 0) return {out, lse};
  with_float_type(oa.scalar_type(), [&](auto a) {
    using a_t = decltype(a);
    with_float_type(ob.scalar_type(), [&](auto b) {
      using b_t = decltype(b);
      merge_rows<a_t, b_t>(static_cast<const a_t*>(oa.const_data_ptr()), la.data_ptr<float>(),
                           static_cast<const b_t*>(ob.const_data_ptr()), lb.data_ptr<float>(),
                           static_cast<a_t*>(out.data_ptr()), lse.data_ptr<float>(), rows,
                           d.head_size);
    });
  });
  return {out, lse};
}

}  // namespace pagedkv::cpu
