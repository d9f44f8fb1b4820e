// paged_attention and paged_attention_lse, CPU backend: validate everything, plan work
// items, run the kernel.
#include "checks.h"
#include "cpu/isa.h"
#include "cpu/ops_cpu.h"
#include "knobs.h"

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>

namespace pagedkv::cpu {
namespace {

// The work tiling comes from the knobs (knobs.h CpuTiling, read once per call); the
// defaults, measured on the 2-core AVX2 EPYC:
// - vectors_per_head 32: query vectors (rows x GQA heads) per kv head in a work item:
//   enough to reuse each K/V row from L1 across many dot products, small enough for
//   L1/L2-resident scratch.
// - vectors_per_item 64: query vectors per work item when several kv heads share it
//   (decode).
// - prefix_vectors_per_head 256: the matrix-style tile (causal=False, a shared prefix, and
//   causal prefill without a sliding window): its rows see the same keys (causal: up to
//   the diagonal), so one tile takes up to this many vectors per kv head and reads each
//   K/V row once for all of them; 256 vectors (64 decode rows of a 4-head GQA group) keep the
//   tile's query and accumulator rows (2 x 128 KB at head size 128) in a 1 MB L2.
// - serial_products 2048: work of at most this many query-key products (query vectors x
//   keys, all heads) runs on the calling thread. Measured here (32/8 heads, head 128):
//   batch 1 x context 16 (512 products) takes 12 us on one thread or two; at 2K products
//   (batch 1 x context 64) two threads save 3-6 us of 25; but while another process holds
//   a core, a two-thread region waits out its time slice: 8-12 ms.

// The work items, and in `products` the query-key products they cover (all heads).
std::vector<WorkItem> plan_items(const CpuTiling& t, const int32_t* qsl, const int32_t* seq_lens,
                                 int64_t num_seqs, int num_kv_heads, int group,
                                 int64_t sliding_window, bool causal, int64_t& products) {
  // Matrix-style tiles (attention_prefix.h) where no sliding window cuts the rows' keys
  // apart: causal=False, and causal prefill (a decode row is one row: its tile is short).
  const bool tall = !causal || sliding_window <= 0;
  int tile_rows = std::max(1, (tall ? t.prefix_vectors_per_head : t.vectors_per_head) / group);
  const int min_tile_rows = std::max(1, t.vectors_per_head / group);
  // Widest kv-head range (and tallest row tile) first; narrower ones only
  // while the threads would starve.
  const int64_t want = (causal ? 4 : 2) * int64_t(at::get_num_threads());
  std::vector<std::pair<int64_t, WorkItem>> costed;
  for (int limit = num_kv_heads;;) {
    costed.clear();
    for (int64_t i = 0; i < num_seqs; ++i) {
      const int32_t q_len = qsl[i + 1] - qsl[i];
      const int64_t base = int64_t(seq_lens[i]) - q_len;
      for (int32_t r = 0; r < q_len; r += tile_rows) {
        const int32_t r_end = std::min(q_len, r + tile_rows);
        const int heads = std::clamp(t.vectors_per_item / ((r_end - r) * group), 1, limit);
        const int64_t last = causal ? base + r_end - 1 : int64_t(seq_lens[i]) - 1;
        const int64_t first_key =
            sliding_window > 0 ? std::max<int64_t>(0, base + r - sliding_window + 1) : 0;
        for (int h = 0; h < num_kv_heads; h += heads) {
          const int h_end = std::min(num_kv_heads, h + heads);
          const int64_t cost = int64_t(r_end - r) * (h_end - h) * (last - first_key + 1);
          costed.push_back({cost, WorkItem{int32_t(i), h, h_end, r, r_end}});
        }
      }
    }
    if (int64_t(costed.size()) >= want) break;
    if (limit > 1) {
      limit = (limit + 1) / 2;
    } else if (tile_rows > min_tile_rows) {
      tile_rows = std::max(min_tile_rows, tile_rows / 2);
    } else {
      break;
    }
  }
  // Longest first: threads pulling from a shared counter then finish together.
  std::stable_sort(costed.begin(), costed.end(),
                   [](const auto& x, const auto& y) { return x.first > y.first; });
  std::vector<WorkItem> items;
  items.reserve(costed.size());
  products = 0;
  for (auto& c : costed) {
    items.push_back(c.second);
    products += c.first * group;
  }
  return items;
}

QueryKind query_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return QueryKind::kHalf;
    case at::kBFloat16: return QueryKind::kBFloat16;
    default: return QueryKind::kFloat;
  }
}

// Runs the kernel over validated arguments; fills out and, when defined, lse.
void run_attention(const AttentionDims& d, const at::Tensor& query, const at::Tensor& key_cache,
                   const at::Tensor& value_cache, const at::Tensor& block_table,
                   const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale,
                   const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                   double softcap, const std::optional<at::Tensor>& k_scale,
                   const std::optional<at::Tensor>& v_scale, bool causal, at::Tensor& out,
                   at::Tensor& lse) {
  const at::Tensor bt = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor sl = seq_lens.contiguous(), qsl = query_start_loc.contiguous();
  const at::Tensor alibi = alibi_slopes.has_value() ? alibi_slopes->contiguous() : at::Tensor();
  const bool fp8 = is_fp8(key_cache.scalar_type());

  AttnArgs a;
  a.query = query.data_ptr();
  a.q_stride_tok = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.out = out.data_ptr();
  a.lse = lse.defined() ? lse.data_ptr<float>() : nullptr;
  a.key_cache = key_cache.data_ptr();
  a.value_cache = value_cache.data_ptr();
  a.cache_stride_tok = d.cache.num_kv_heads * d.cache.head_size;
  a.block_table = bt.data_ptr<int32_t>();
  a.block_table_stride = bt.stride(0);
  a.seq_lens = sl.data_ptr<int32_t>();
  a.query_start_loc = qsl.data_ptr<int32_t>();
  a.alibi_slopes = alibi.defined() ? alibi.data_ptr<float>() : nullptr;
  a.scale = float(scale);
  a.softcap = softcap > 0 ? float(softcap) : 0.f;
  a.k_scale = fp8 && k_scale.has_value() ? k_scale->item<float>() : 1.f;
  a.v_scale = fp8 && v_scale.has_value() ? v_scale->item<float>() : 1.f;
  a.sliding_window = sliding_window > 0 ? sliding_window : -1;
  a.causal = causal;
  a.num_heads = int(d.num_heads);
  a.num_kv_heads = int(d.cache.num_kv_heads);
  a.head_size = int(d.cache.head_size);
  a.block_size = int(d.cache.block_size);

  const Kernels& k = kernels();  // raises if the knob names a variant this CPU lacks
  const CpuTiling tiling = cpu_tiling();
  int64_t products = 0;
  const std::vector<WorkItem> items =
      plan_items(tiling, a.query_start_loc, a.seq_lens, d.num_seqs, a.num_kv_heads,
                 a.num_heads / a.num_kv_heads, a.sliding_window, causal, products);
  a.serial = products <= tiling.serial_products || at::get_num_threads() == 1;
  if (fp8) {
    const Fp8Kind c = key_cache.scalar_type() == at::ScalarType::Float8_e4m3fn ? Fp8Kind::kE4m3
                                                                              : Fp8Kind::kE5m2;
    k.attention_fp8(a, items, query_kind(query.scalar_type()), c);
    return;
  }
  switch (query.scalar_type()) {
    case at::kHalf: k.attention_half(a, items); break;
    case at::kBFloat16: k.attention_bfloat16(a, items); break;
    default: k.attention_float(a, items); break;
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

std::tuple<int64_t, int64_t, bool> attention_plan(const at::Tensor& seq_lens,
                                                  const at::Tensor& query_start_loc,
                                                  int64_t num_heads, int64_t num_kv_heads,
                                                  int64_t sliding_window, bool causal) {
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.numel() == seq_lens.numel() + 1 && num_kv_heads > 0 &&
                  num_heads % num_kv_heads == 0,
              "_cpu_attention_plan: int32 seq_lens [n] and query_start_loc [n + 1], and "
              "num_heads a multiple of num_kv_heads");
  const at::Tensor sl = seq_lens.contiguous(), qsl = query_start_loc.contiguous();
  const CpuTiling tiling = cpu_tiling();
  int64_t products = 0;
  const std::vector<WorkItem> items =
      plan_items(tiling, qsl.data_ptr<int32_t>(), sl.data_ptr<int32_t>(), sl.numel(),
                 int(num_kv_heads), int(num_heads / num_kv_heads),
                 sliding_window > 0 ? sliding_window : -1, causal, products);
  return {int64_t(items.size()), products,
          products <= tiling.serial_products || at::get_num_threads() == 1};
}

at::Tensor paged_attention(const at::Tensor& query_in, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, const std::optional<at::Tensor>& alibi_slopes,
                           int64_t sliding_window, double softcap,
                           const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& v_scale) {
  const char* op = "paged_attention";
  const AttentionDims d = validate_paged_attention(op, query_in, key_cache, value_cache,
                                                   block_table, seq_lens, query_start_loc,
                                                   alibi_slopes, k_scale, v_scale);
  check_attention_ranges(op, block_table, seq_lens, query_start_loc, d);
  const at::Tensor query = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  at::Tensor out = at::empty({d.num_q_tokens, d.num_heads, d.cache.head_size}, query.options());
  if (d.num_q_tokens == 0) return out;
  at::Tensor no_lse;
  run_attention(d, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                alibi_slopes, sliding_window, softcap, k_scale, v_scale, /*causal=*/true, out,
                no_lse);
  return out;
}

std::tuple<at::Tensor, at::Tensor> paged_attention_lse(
    const at::Tensor& query_in, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
    double scale, const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
    double softcap, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, bool causal) {
  const AttentionDims d = validate_paged_attention_lse(
      query_in, key_cache, value_cache, block_table, seq_lens, query_start_loc, alibi_slopes,
      sliding_window, k_scale, v_scale, causal);
  check_attention_ranges("paged_attention_lse", block_table, seq_lens, query_start_loc, d,
                         causal);
  const at::Tensor query = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  at::Tensor out = at::empty({d.num_q_tokens, d.num_heads, d.cache.head_size}, query.options());
  at::Tensor lse = at::empty({d.num_q_tokens, d.num_heads}, query.options().dtype(at::kFloat));
  if (d.num_q_tokens == 0) return {out, lse};
  run_attention(d, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                alibi_slopes, sliding_window, softcap, k_scale, v_scale, causal, out, lse);
  return {out, lse};
}

}  // namespace pagedkv::cpu
