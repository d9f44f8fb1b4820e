// The CUDA kernels' ATen entry points, registered in register_cuda.cpp, and the small
// helpers the glue files share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace pagedkv::cuda {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale);

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           double scale, const std::optional<at::Tensor>& alibi_slopes,
                           int64_t sliding_window, double softcap,
                           const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& v_scale);

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping);

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping);

// Private ops (schemas at the end of ops_catalog.cpp).
void set_launch_config(const std::string& device_name, int64_t head_size,
                       const std::string& dtype, int64_t block_size, int64_t decode_threads,
                       int64_t partition_size, int64_t prefill_threads, int64_t write_threads);
void clear_launch_configs();
std::vector<int64_t> launch_config(const std::string& device_name, int64_t head_size,
                                   const std::string& dtype, int64_t block_size);
std::vector<int64_t> occupancy(const std::string& kernel, const std::string& query_dtype,
                               const std::string& cache_dtype, int64_t head_size,
                               int64_t num_heads, int64_t num_kv_heads, int64_t threads,
                               int64_t partition_size);

// Shared by the glue files.
DType dtype_of(at::ScalarType t);
at::ScalarType scalar_type_of(DType d);
bool generic_kernels_forced();       // PAGEDKV_GENERIC_KERNELS=1, read per call
bool debug_range_checks();           // PAGEDKV_DEBUG=1 and the stream is not capturing
void check_aligned(const char* op, const char* name, const at::Tensor& t, int64_t bytes);

}  // namespace pagedkv::cuda
