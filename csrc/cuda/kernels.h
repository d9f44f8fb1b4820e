// The torch-free interface between the ATen glue (csrc/cuda/*.cpp) and the CUDA kernels
// (csrc/cuda/*.cu): raw pointers, sizes, strides and a cudaStream_t. Keeping torch out
// of the .cu files makes them compile in seconds (BUILD.md).
//
// Every kernel is graph-safe: its grid depends only on tensor shapes and it reads all
// metadata (slots, block tables, lengths, mappings, fp8 scales) on the device. Every
// kernel bounds-checks the indices it reads and skips out-of-range ones, so bad
// metadata never causes an out-of-bounds access (PAGEDKV_DEBUG=1 turns it into an error
// on the host instead; see checks.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pagedkv::cuda {

// Element-type tags. The glue picks one per tensor dtype; the .cu files map them to
// device types (common.cuh). fp8 caches hold raw bytes read as e4m3fn or e5m2.
struct F32 {};
struct F16 {};
struct BF16 {};
struct E4M3 {};
struct E5M2 {};

enum class DType : int { kFloat32 = 0, kFloat16, kBFloat16, kFp8E4M3, kFp8E5M2 };
constexpr int kNumDTypes = 5;

// Launch configuration of one (GPU, head size, cache dtype, block size); see
// launch_config.h for the table and the heuristic.
struct LaunchConfig {
  int decode_threads;   // threads per CTA of the split-K decode kernel: 64, 128 or 256
  int partition_size;   // keys per decode partition (split-K), multiple of 64 in [64, 1024]
  int prefill_threads;  // threads per CTA of the prefill/mixed kernel: 64, 128 or 256
  int write_threads;    // threads per CTA of reshape_and_cache: 64..512, multiple of 32
};

// ---------------------------------------------------------------------------------------
// paged_attention
// ---------------------------------------------------------------------------------------

// Query heads one CTA serves together (sharing each K/V load). A GQA group larger than
// this is split into equal chunks of at most 8 heads, each chunk one CTA.
constexpr int kMaxHeadsPerCta = 8;

struct AttentionParams {
  const void* query;  // [num_q_tokens, num_heads, head_size], any strides
  int64_t q_stride_tok, q_stride_head, q_stride_dim;
  void* out;  // contiguous [num_q_tokens, num_heads, head_size], query dtype
  float* lse;  // contiguous [num_q_tokens, num_heads] (paged_attention_lse), or nullptr
  const void* key_cache;    // contiguous [num_blocks, block_size, num_kv_heads, head_size],
  const void* value_cache;  // 16-byte aligned
  const int32_t* block_table;  // [num_seqs, max_blocks_per_seq], unit column stride
  int64_t block_table_stride;
  const int32_t* seq_lens;         // [num_seqs]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const float* alibi_slopes;       // [num_heads] or nullptr
  const float* k_scale;            // device scalars (fp8 caches only) or nullptr = 1.0
  const float* v_scale;
  float scale;
  float softcap;       // <= 0: off
  int sliding_window;  // <= 0: off
  bool causal;         // false: every query row of a sequence sees all of its seq_len keys
  // Mixed batches: the split-K decode kernel serves the sequences with exactly one query
  // row (its grid x runs over sequences) and the prefill kernel skips them, so a
  // long-context decode row inside a chunked-prefill batch is split like any decode.
  bool single_rows_to_decode;
  int num_q_tokens, num_seqs, num_heads, num_kv_heads, head_size, block_size, num_blocks;
  int max_blocks_per_seq;
};

// Decode (split-K flash-decoding): one CTA per (query row, kv head [chunk], split); split
// s of a row walks its partitions of `partition_size` keys s, s + splits, ... With more
// than one split, the glue provides float32 scratch: part_out [rows, num_heads, splits,
// head_size] and part_max/part_sum [rows, num_heads, splits].
struct DecodeScratch {
  float* part_out;
  float* part_max;
  float* part_sum;
};

// Number of partitions of the block table's width: ceil(max_blocks_per_seq * block_size /
// partition_size), a function of shapes only.
int64_t decode_num_partitions(const AttentionParams& p, int partition_size);

// The decode kernel's grid and scratch, from shapes and the device's SM count only (so
// graph-safe): `rows` (grid x) is num_q_tokens, or num_seqs with single_rows_to_decode;
// `splits` (grid z) gives the device about kDecodeCtasPerSm CTAs per SM, or more while
// the scratch stays within kDecodeScratchBytes, never more than the table's partitions.
// The scratch is thus bounded by the device and the batch, not by the table's width (a
// 128k-token table used to cost rows x heads x 256 partitions x (head_size + 2) floats).
constexpr int64_t kDecodeCtasPerSm = 16;
constexpr int64_t kDecodeScratchBytes = int64_t(64) << 20;
struct DecodePlan {
  int64_t rows;
  int64_t splits;
  int64_t scratch_floats;  // 0 when splits == 1: every CTA writes its output directly
};
// max_splits > 0 caps the splits (the decode_splits knob).
DecodePlan decode_plan(const AttentionParams& p, int partition_size, int num_sms,
                       int max_splits = 0);

// Query heads per CTA for a GQA group of `group` heads (<= kMaxHeadsPerCta, balanced).
int heads_per_cta(int group);

// Prefill/mixed: a CTA takes a tile of query rows of one sequence x a chunk of a GQA
// group: `qv` query vectors (rows x heads) against `kt` keys at a time, staged in shared
// memory as float32; `lanes` lanes share one score's dot product (long heads).
struct PrefillTile {
  int qv, kt, lanes;
};
constexpr PrefillTile prefill_tile(int head_size) {
  return head_size <= 128 ? PrefillTile{32, 32, 1}
                          : (head_size <= 256 ? PrefillTile{16, 16, 4} : PrefillTile{8, 8, 4});
}
// Rows per tile for this head size and group (a function of shapes only).
int prefill_rows_per_tile(int head_size, int group);
size_t prefill_smem_bytes(int head_size);
size_t decode_smem_bytes(int head_size, int heads, int partition_size);

// Per (query dtype, cache dtype) pair; instantiated in decode_<q>.cu / decode_fp8_<q>.cu and
// prefill_<q>.cu / prefill_fp8_<q>.cu (one file per query dtype, so ninja builds them in parallel).
// `generic` forces the kernel that reads the head size at run time.
template <typename Q, typename C>
cudaError_t launch_decode(const AttentionParams& p, const DecodeScratch& s,
                          const DecodePlan& plan, const LaunchConfig& cfg, bool generic,
                          cudaStream_t stream);
template <typename Q, typename C>
cudaError_t launch_prefill(const AttentionParams& p, const LaunchConfig& cfg, bool generic,
                           cudaStream_t stream);

// Resource usage of one kernel instantiation, for `pagedkv occupancy`.
struct KernelInfo {
  int max_active_blocks_per_sm;
  int num_regs;
  int local_bytes;  // register spills
  int static_smem_bytes;
  int dynamic_smem_bytes;
  int max_threads_per_block;
};
enum class AttentionKernel : int { kDecode = 0, kDecodeReduce };
template <typename Q, typename C>
cudaError_t decode_kernel_info(AttentionKernel which, int head_size, int heads_per_cta,
                               bool generic, int threads, size_t dynamic_smem, KernelInfo* info);
template <typename Q, typename C>
cudaError_t prefill_kernel_info(int head_size, bool generic, int threads, size_t dynamic_smem,
                                KernelInfo* info);

// ---------------------------------------------------------------------------------------
// merge_attn_states (merge_states.cu)
// ---------------------------------------------------------------------------------------

struct MergeParams {
  const void* out_a;  // contiguous [rows, head_size], dtype a
  const float* lse_a;  // [rows]
  const void* out_b;  // contiguous [rows, head_size], dtype b
  const float* lse_b;
  void* out;  // contiguous [rows, head_size], dtype a
  float* lse;
  int64_t rows;  // num_tokens * num_heads
  int64_t head_size;
};
cudaError_t launch_merge_attn_states(const MergeParams& p, DType a, DType b, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// reshape_and_cache, copy_blocks, swap_blocks (cache_kernels.cu)
// ---------------------------------------------------------------------------------------

struct WriteParams {
  const void* key;  // [num_tokens, num_kv_heads, head_size]: rows of row_elems contiguous
  const void* value;
  int64_t key_stride_tok, value_stride_tok;  // elements
  void* key_cache;  // contiguous, num_slots rows of row_elems elements
  void* value_cache;
  const int64_t* slot_mapping;  // [num_tokens]
  const float* k_scale;         // fp8 only; nullptr = 1.0
  const float* v_scale;
  int64_t num_tokens, num_slots, row_elems;  // row_elems = num_kv_heads * head_size
};

// Input dtype x cache dtype (same dtype, or any float input with an fp8 cache).
cudaError_t launch_reshape_and_cache(const WriteParams& p, DType input, DType cache,
                                     int threads, cudaStream_t stream);

// copy_blocks: per-layer pointers travel in the kernel's parameters (by value), so one
// launch covers up to kMaxCopyLayers layers with no device-side pointer array.
constexpr int kMaxCopyLayers = 96;
struct CopyLayer {
  char* key;  // contiguous [num_blocks, ...]
  char* value;
  int64_t num_blocks;
  int64_t block_bytes;
};
struct CopyLayers {
  CopyLayer layer[kMaxCopyLayers];
  int num_layers;
};
cudaError_t launch_copy_blocks(const CopyLayers& layers, const int64_t* block_mapping,
                               int64_t num_pairs, cudaStream_t stream);

// swap_blocks with the mapping on the device: src and dst are device memory or pinned
// host memory (addressable from kernels through unified virtual addressing).
cudaError_t launch_swap_blocks(const char* src, char* dst, int64_t src_blocks,
                               int64_t dst_blocks, int64_t block_bytes,
                               const int64_t* block_mapping, int64_t num_pairs,
                               cudaStream_t stream);

cudaError_t cache_kernel_info(int which /*0 write, 1 copy, 2 swap*/, DType input, DType cache,
                              int threads, KernelInfo* info);

}  // namespace pagedkv::cuda
