// The CUDA kernels' ATen entry points, registered in register_cuda.cpp, and the small
// helpers the glue files share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "backend_ops.h"
#include "cuda/kernels.h"

namespace pagedkv::cuda {

PAGEDKV_DECLARE_BACKEND_OPS()

// Shared by the glue files.
DType dtype_of(at::ScalarType t);
at::ScalarType scalar_type_of(DType d);
bool debug_range_checks();  // the debug knob (knobs.h) is on and the stream is not capturing
void check_aligned(const char* op, const char* name, const at::Tensor& t, int64_t bytes);

}  // namespace pagedkv::cuda
