// The namespace the ops are registered in: torch.ops.pagedkv, or torch.ops.pagedkv_simt
// for the SIMT-emulated CUDA library (setup.py defines PAGEDKV_OPS_NS there), which
// compiles the same registration files.
#pragma once

#ifndef PAGEDKV_OPS_NS
#define PAGEDKV_OPS_NS pagedkv
#endif
#define PAGEDKV_STRINGIFY_(x) #x
#define PAGEDKV_STRINGIFY(x) PAGEDKV_STRINGIFY_(x)
#define PAGEDKV_OPS_NS_STR PAGEDKV_STRINGIFY(PAGEDKV_OPS_NS)
