// The CUDA kernels' ATen entry points, registered in register_cuda.cpp, and the small
// helpers the glue files share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "backend_ops.h"
#include "cuda/kernels.h"

namespace pagedkv::cuda {

PAGEDKV_DECLARE_BACKEND_OPS()

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
bool debug_range_checks();           // PAGEDKV_DEBUG=1 and the stream is not capturing
void check_aligned(const char* op, const char* name, const at::Tensor& t, int64_t bytes);

}  // namespace pagedkv::cuda
