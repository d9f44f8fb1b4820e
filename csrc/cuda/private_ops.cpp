// The private ops of CUDA builds (torch_pagedkv/tuning): they fill the launch-config
// table, read it back and report occupancy. Not part of the public catalog
// (ops_catalog.cpp): a CPU-only build does not have them at all.
#include <torch/library.h>

#include <string>
#include <vector>

#include "knobs.h"
#include "ops_namespace.h"
#include "cuda/device.h"
#include "cuda/launch_config.h"
#include "cuda/ops_cuda.h"

namespace pagedkv::cuda {
namespace {

DType parse_dtype_or_throw(const char* op, const std::string& name) {
  DType d;
  TORCH_CHECK(parse_dtype(name, &d), op, ": dtype must be one of float32, float16, bfloat16, "
              "float8_e4m3fn, float8_e5m2, got '", name, "'");
  return d;
}

void set_launch_config(const std::string& device_name, int64_t head_size,
                       const std::string& dtype, int64_t block_size, int64_t decode_threads,
                       int64_t partition_size, int64_t prefill_threads, int64_t write_threads) {
  const char* op = "_set_launch_config";
  const DType d = parse_dtype_or_throw(op, dtype);
  TORCH_CHECK(head_size >= 8 && head_size <= 512 && head_size % 8 == 0, op,
              ": head_size must be a multiple of 8 in [8, 512], got ", head_size);
  TORCH_CHECK(block_size >= 1 && block_size <= 256, op, ": block_size must be in [1, 256], got ",
              block_size);
  const LaunchConfig c{int(decode_threads), int(partition_size), int(prefill_threads),
                       int(write_threads)};
  const std::string err = config_error(c);
  TORCH_CHECK(err.empty(), op, ": ", err);
  set_config(device_name, int(head_size), d, int(block_size), c);
}

void clear_launch_configs() { clear_configs(); }

std::vector<int64_t> launch_config(const std::string& device_name, int64_t head_size,
                                   const std::string& dtype, int64_t block_size) {
  const DType d = parse_dtype_or_throw("_launch_config", dtype);
  bool from_table = false;
  const LaunchConfig c = find_config(device_name, int(head_size), d, int(block_size), &from_table);
  return {c.decode_threads, c.partition_size, c.prefill_threads, c.write_threads,
          from_table ? 1 : 0};
}

std::vector<int64_t> occupancy(const std::string& kernel, const std::string& query_dtype,
                               const std::string& cache_dtype, int64_t head_size,
                               int64_t num_heads, int64_t num_kv_heads, int64_t threads,
                               int64_t partition_size) {
  const char* op = "_occupancy";
  const DType q = parse_dtype_or_throw(op, query_dtype);
  const DType c = parse_dtype_or_throw(op, cache_dtype);
  TORCH_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, op,
              ": num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(head_size >= 8 && head_size <= 512 && head_size % 8 == 0, op,
              ": head_size must be a multiple of 8 in [8, 512], got ", head_size);
  TORCH_CHECK(device_count() > 0, op, ": no CUDA device");
  const int device = current_device();
  const DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, device));
  const int hp = heads_per_cta(int(num_heads / num_kv_heads));
  const bool generic = generic_kernels_forced();
  KernelInfo info{};
  cudaError_t err = cudaErrorInvalidValue;
  auto attention = [&](auto qt, auto ct) {
    using Q = decltype(qt);
    using C = decltype(ct);
    if (kernel == "decode") {
      err = decode_kernel_info<Q, C>(AttentionKernel::kDecode, int(head_size), hp, generic,
                                     int(threads),
                                     decode_smem_bytes(int(head_size), hp, int(partition_size)),
                                     &info);
    } else if (kernel == "decode_reduce") {
      err = decode_kernel_info<Q, C>(AttentionKernel::kDecodeReduce, int(head_size), hp, generic,
                                     int(threads), 0, &info);
    } else {
      err = prefill_kernel_info<Q, C>(int(head_size), generic, int(threads),
                                      prefill_smem_bytes(int(head_size)), &info);
    }
  };
  if (kernel == "decode" || kernel == "decode_reduce" || kernel == "prefill") {
    const bool cache_fp8 = c == DType::kFp8E4M3 || c == DType::kFp8E5M2;
    TORCH_CHECK(q != DType::kFp8E4M3 && q != DType::kFp8E5M2 && (cache_fp8 || q == c), op,
                ": query dtype ", query_dtype, " does not go with cache dtype ", cache_dtype);
    auto with_cache = [&](auto qt) {
      switch (c) {
        case DType::kFp8E4M3: attention(qt, E4M3{}); break;
        case DType::kFp8E5M2: attention(qt, E5M2{}); break;
        default: attention(qt, qt); break;
      }
    };
    switch (q) {
      case DType::kFloat16: with_cache(F16{}); break;
      case DType::kBFloat16: with_cache(BF16{}); break;
      default: with_cache(F32{}); break;
    }
  } else if (kernel == "reshape_and_cache") {
    err = cache_kernel_info(0, q, c, int(threads), &info);
  } else if (kernel == "copy_blocks") {
    err = cache_kernel_info(1, q, c, int(threads), &info);
  } else if (kernel == "swap_blocks") {
    err = cache_kernel_info(2, q, c, int(threads), &info);
  } else {
    TORCH_CHECK(false, op, ": kernel must be one of decode, decode_reduce, prefill, "
                "reshape_and_cache, copy_blocks, swap_blocks, got '", kernel, "'");
  }
  PAGEDKV_CUDA_CHECK(err);
  cudaDeviceProp prop{};
  PAGEDKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return {info.max_active_blocks_per_sm, info.num_regs, info.local_bytes,
          info.static_smem_bytes, info.dynamic_smem_bytes, info.max_threads_per_block,
          prop.maxThreadsPerMultiProcessor, prop.multiProcessorCount};
}

// [rows, splits, scratch bytes] of the decode kernel for these shapes on a GPU with
// num_sms SMs (decode_plan and the decode_splits knob, as the launch uses them); mixed: a
// batch with more query rows than sequences, whose single-row sequences the decode
// kernel serves.
std::vector<int64_t> decode_plan_for(int64_t num_q_tokens, int64_t num_seqs, int64_t num_heads,
                                     int64_t num_kv_heads, int64_t head_size, int64_t block_size,
                                     int64_t max_blocks_per_seq, int64_t partition_size,
                                     int64_t num_sms, bool mixed) {
  const char* op = "_decode_plan";
  TORCH_CHECK(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, op,
              ": num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(partition_size >= 1, op, ": partition_size must be >= 1, got ", partition_size);
  AttentionParams p{};
  p.num_q_tokens = int(num_q_tokens);
  p.num_seqs = int(num_seqs);
  p.num_heads = int(num_heads);
  p.num_kv_heads = int(num_kv_heads);
  p.head_size = int(head_size);
  p.block_size = int(block_size);
  p.max_blocks_per_seq = int(max_blocks_per_seq);
  p.single_rows_to_decode = mixed;
  const DecodePlan plan = decode_plan(p, int(partition_size), int(num_sms), decode_splits_cap());
  return {plan.rows, plan.splits, plan.scratch_floats * int64_t(sizeof(float))};
}

}  // namespace
}  // namespace pagedkv::cuda

TORCH_LIBRARY_FRAGMENT(PAGEDKV_OPS_NS, m) {
  // Set one launch-config entry for a GPU name (torch_pagedkv/tuning/table.py).
  m.def(
      "_set_launch_config(str device_name, int head_size, str dtype, int block_size, "
      "int decode_threads, int partition_size, int prefill_threads, int write_threads) -> ()");
  // Drop every launch-config entry, so launches fall back to the heuristic.
  m.def("_clear_launch_configs() -> ()");
  // Fill the table from torch_pagedkv's JSON files. Its kernel is Python, registered by
  // torch_pagedkv/_load.py; the table runs it once, at its first use (launch_config.cpp).
  m.def("_install_launch_configs() -> ()");
  // [decode_threads, partition_size, prefill_threads, write_threads, from_table] a launch uses.
  m.def("_launch_config(str device_name, int head_size, str dtype, int block_size) -> int[]");
  // CUDA occupancy of one kernel config on the current GPU (pagedkv occupancy).
  m.def(
      "_occupancy(str kernel, str query_dtype, str cache_dtype, int head_size, int num_heads, "
      "int num_kv_heads, int threads, int partition_size) -> int[]");
  // [rows, splits, scratch_bytes] of the split-K decode kernel (kernels.h decode_plan).
  m.def(
      "_decode_plan(int num_q_tokens, int num_seqs, int num_heads, int num_kv_heads, "
      "int head_size, int block_size, int max_blocks_per_seq, int partition_size, int num_sms, "
      "bool mixed) -> int[]");
}

// The private ops take no tensors, so the dispatcher has no backend key for them: a
// CompositeExplicitAutograd kernel is what it calls.
TORCH_LIBRARY_IMPL(PAGEDKV_OPS_NS, CompositeExplicitAutograd, m) {
  m.impl("_set_launch_config", &pagedkv::cuda::set_launch_config);
  m.impl("_clear_launch_configs", &pagedkv::cuda::clear_launch_configs);
  m.impl("_launch_config", &pagedkv::cuda::launch_config);
  m.impl("_occupancy", &pagedkv::cuda::occupancy);
  m.impl("_decode_plan", &pagedkv::cuda::decode_plan_for);
}
