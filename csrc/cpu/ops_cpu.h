// The CPU kernels' ATen entry points, registered in register_cpu.cpp.
#pragma once

#include "backend_ops.h"

namespace pagedkv::cpu {

PAGEDKV_DECLARE_BACKEND_OPS()

}  // namespace pagedkv::cpu
