// paged_attention, paged_attention_lse and merge_attn_states, CUDA backend: validate on
// the host (shapes, dtypes, devices, strides; index ranges only in debug mode), choose the
// decode and/or prefill kernel from shapes alone, size the split-K scratch from shapes and
// the device alone (bounded: decode_plan), launch on the current stream. Nothing here
// reads metadata values, so the ops are capturable by CUDA graphs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "checks.h"
#include "knobs.h"
#include "cuda/device.h"
#include "cuda/launch_config.h"
#include "cuda/ops_cuda.h"

namespace pagedkv::cuda {
namespace {

// Which kernels serve a batch, from shapes alone. Decode (one CTA row per query row,
// split-K over the keys) serves a batch with at most one query row per sequence on
// average. Otherwise the prefill kernel shares each K/V tile across a tile of rows, and
// the sequences with a single query row (decodes inside a chunked-prefill batch) go to
// the split-K decode kernel, so a long context is not walked by one CTA per kv head.
// Both kernels are correct for any batch; the attention_path knob sends the whole batch
// to one of them (tests cross-check the two).
enum class Route { kDecode, kPrefill, kMixed };
Route route(int64_t num_q_tokens, int64_t num_seqs) {
  switch (attention_path()) {
    case AttentionPath::kDecode: return Route::kDecode;
    case AttentionPath::kPrefill: return Route::kPrefill;
    default: return num_q_tokens <= num_seqs ? Route::kDecode : Route::kMixed;
  }
}

// Runs f(QueryTag, CacheTag) for the validated dtypes: a non-fp8 cache has the query's
// dtype, an fp8 cache takes any float query.
template <typename F>
void with_dtypes(at::ScalarType q, at::ScalarType c, F&& f) {
  auto with_query = [&](auto cache_tag) {
    switch (q) {
      case at::kHalf: f(F16{}, cache_tag); break;
      case at::kBFloat16: f(BF16{}, cache_tag); break;
      default: f(F32{}, cache_tag); break;
    }
  };
  switch (c) {
    case at::kHalf: f(F16{}, F16{}); break;
    case at::kBFloat16: f(BF16{}, BF16{}); break;
    case at::ScalarType::Float8_e4m3fn: with_query(E4M3{}); break;
    case at::ScalarType::Float8_e5m2: with_query(E5M2{}); break;
    default: f(F32{}, F32{}); break;
  }
}

const int32_t* int_ptr(const at::Tensor& t) { return t.data_ptr<int32_t>(); }

// Validated arguments in, out (and lse when defined) written on the current stream.
void run_attention(const char* op, const AttentionDims& d, const at::Tensor& query,
                   const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                   const at::Tensor& query_start_loc, double scale,
                   const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
                   double softcap, const std::optional<at::Tensor>& k_scale,
                   const std::optional<at::Tensor>& v_scale, bool causal, at::Tensor& out,
                   at::Tensor& lse) {
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(d.num_q_tokens <= kIntMax && d.cache.num_blocks <= kIntMax &&
                  d.max_blocks_per_seq * d.cache.block_size <= kIntMax,
              op, ": sizes must fit in int32 (num_q_tokens ", d.num_q_tokens, ", num_blocks ",
              d.cache.num_blocks, ", max_blocks_per_seq * block_size ",
              d.max_blocks_per_seq * d.cache.block_size, ")");
  TORCH_CHECK(d.num_heads <= 65535, op, ": num_heads must be <= 65535, got ", d.num_heads);
  check_aligned(op, "key_cache", key_cache, 16);
  check_aligned(op, "value_cache", value_cache, 16);

  // Kernels index the metadata with unit strides; views with other strides are copied
  // (on the stream, so still graph-safe: a replay copies the updated values again).
  const at::Tensor bt = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor sl = seq_lens.contiguous(), qsl = query_start_loc.contiguous();
  const at::Tensor alibi = alibi_slopes.has_value() ? alibi_slopes->contiguous() : at::Tensor();
  const bool fp8 = is_fp8(key_cache.scalar_type());

  AttentionParams p{};
  p.query = query.data_ptr();
  p.q_stride_tok = query.stride(0);
  p.q_stride_head = query.stride(1);
  p.q_stride_dim = query.stride(2);
  p.out = out.data_ptr();
  p.lse = lse.defined() ? lse.data_ptr<float>() : nullptr;
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.block_table = int_ptr(bt);
  p.block_table_stride = bt.stride(0);
  p.seq_lens = int_ptr(sl);
  p.query_start_loc = int_ptr(qsl);
  p.alibi_slopes = alibi.defined() ? alibi.data_ptr<float>() : nullptr;
  // Scales are read on the device, so changing one never re-captures a graph.
  p.k_scale = fp8 && k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 && v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  p.scale = float(scale);
  p.softcap = softcap > 0 ? float(softcap) : 0.f;
  p.sliding_window = sliding_window > 0 ? int(std::min<int64_t>(sliding_window, kIntMax)) : -1;
  p.causal = causal;
  p.num_q_tokens = int(d.num_q_tokens);
  p.num_seqs = int(d.num_seqs);
  p.num_heads = int(d.num_heads);
  p.num_kv_heads = int(d.cache.num_kv_heads);
  p.head_size = int(d.cache.head_size);
  p.block_size = int(d.cache.block_size);
  p.num_blocks = int(d.cache.num_blocks);
  p.max_blocks_per_seq = int(d.max_blocks_per_seq);

  const LaunchConfig cfg = config_for_device(device_index(key_cache.device()), p.head_size,
                                             dtype_of(key_cache.scalar_type()), p.block_size);
  const bool generic = generic_kernels_forced();
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t head_chunks = (group + heads_per_cta(group) - 1) / heads_per_cta(group);
  TORCH_CHECK(p.num_kv_heads * head_chunks <= 65535, op, ": too many kv heads (",
              p.num_kv_heads, ") for the grid");
  cudaStream_t stream = current_stream();
  cudaError_t err = cudaSuccess;

  const Route r = route(d.num_q_tokens, d.num_seqs);
  p.single_rows_to_decode = r == Route::kMixed;
  if (r != Route::kDecode) {
    // The prefill tiles cover the rows of sequences only; rows outside every sequence
    // (malformed metadata) must not return uninitialized memory: zero first (the decode
    // kernel zeroes them itself).
    out.zero_();
    if (lse.defined()) lse.fill_(-std::numeric_limits<float>::infinity());
    with_dtypes(query.scalar_type(), key_cache.scalar_type(), [&](auto q, auto c) {
      err = launch_prefill<decltype(q), decltype(c)>(p, cfg, generic, stream);
    });
    PAGEDKV_CUDA_CHECK(err);
  }
  if (r != Route::kPrefill) {
    const DecodePlan plan = decode_plan(p, cfg.partition_size, sm_count(device_index(key_cache.device())),
                                        decode_splits_cap());
    DecodeScratch s{nullptr, nullptr, nullptr};
    at::Tensor scratch;  // bounded by decode_plan; from the caching allocator (graph pool)
    if (plan.scratch_floats > 0) {
      const int64_t slots = plan.scratch_floats / (p.head_size + 2);
      scratch = at::empty({plan.scratch_floats}, query.options().dtype(at::kFloat));
      s.part_out = scratch.data_ptr<float>();
      s.part_max = s.part_out + slots * p.head_size;
      s.part_sum = s.part_max + slots;
    }
    with_dtypes(query.scalar_type(), key_cache.scalar_type(), [&](auto q, auto c) {
      err = launch_decode<decltype(q), decltype(c)>(p, s, plan, cfg, generic, stream);
    });
  }
  PAGEDKV_CUDA_CHECK(err);
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, const std::optional<at::Tensor>& alibi_slopes,
                           int64_t sliding_window, double softcap,
                           const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& v_scale) {
  const char* op = "paged_attention";
  const AttentionDims d = validate_paged_attention(op, query, key_cache, value_cache,
                                                   block_table, seq_lens, query_start_loc,
                                                   alibi_slopes, k_scale, v_scale);
  TORCH_CHECK(on_device(key_cache), op, ": the CUDA kernel needs key_cache on ", kDeviceWord,
              ", got ", key_cache.device());
  const DeviceGuard guard(key_cache.device());
  if (debug_range_checks()) {
    check_attention_ranges(op, block_table.cpu(), seq_lens.cpu(), query_start_loc.cpu(), d);
  }
  at::Tensor out = at::empty({d.num_q_tokens, d.num_heads, d.cache.head_size}, query.options());
  if (d.num_q_tokens == 0) return out;
  at::Tensor no_lse;
  run_attention(op, d, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                scale, alibi_slopes, sliding_window, softcap, k_scale, v_scale,
                /*causal=*/true, out, no_lse);
  return out;
}

std::tuple<at::Tensor, at::Tensor> paged_attention_lse(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
    double scale, const std::optional<at::Tensor>& alibi_slopes, int64_t sliding_window,
    double softcap, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, bool causal) {
  const char* op = "paged_attention_lse";
  const AttentionDims d = validate_paged_attention_lse(
      query, key_cache, value_cache, block_table, seq_lens, query_start_loc, alibi_slopes,
      sliding_window, k_scale, v_scale, causal);
  TORCH_CHECK(on_device(key_cache), op, ": the CUDA kernel needs key_cache on ", kDeviceWord,
              ", got ", key_cache.device());
  const DeviceGuard guard(key_cache.device());
  if (debug_range_checks()) {
    check_attention_ranges(op, block_table.cpu(), seq_lens.cpu(), query_start_loc.cpu(), d,
                           causal);
  }
  at::Tensor out = at::empty({d.num_q_tokens, d.num_heads, d.cache.head_size}, query.options());
  at::Tensor lse = at::empty({d.num_q_tokens, d.num_heads}, query.options().dtype(at::kFloat));
  if (d.num_q_tokens == 0) return {out, lse};
  run_attention(op, d, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
                scale, alibi_slopes, sliding_window, softcap, k_scale, v_scale, causal, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attn_states(const at::Tensor& out_a,
                                                     const at::Tensor& lse_a,
                                                     const at::Tensor& out_b,
                                                     const at::Tensor& lse_b) {
  const char* op = "merge_attn_states";
  const MergeDims d = validate_merge_attn_states(out_a, lse_a, out_b, lse_b);
  TORCH_CHECK(on_device(out_a), op, ": the CUDA kernel needs out_a on ", kDeviceWord, ", got ",
              out_a.device());
  const DeviceGuard guard(out_a.device());
  const at::Tensor oa = out_a.contiguous(), ob = out_b.contiguous();
  const at::Tensor la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty({d.num_tokens, d.num_heads, d.head_size}, oa.options());
  at::Tensor lse = at::empty({d.num_tokens, d.num_heads}, la.options());
  const MergeParams p{oa.data_ptr(), la.data_ptr<float>(), ob.data_ptr(), lb.data_ptr<float>(),
                      out.data_ptr(), lse.data_ptr<float>(), d.num_tokens * d.num_heads,
                      d.head_size};
  if (p.rows == 0) return {out, lse};
  PAGEDKV_CUDA_CHECK(launch_merge_attn_states(p, dtype_of(oa.scalar_type()),
                                              dtype_of(ob.scalar_type()), current_stream()));
  return {out, lse};
}

}  // namespace pagedkv::cuda
