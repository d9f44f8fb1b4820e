// Prologue of the avx2 variant of the CPU kernels (setup.py's generated wrappers include
// it first, then one cpu/kernels/*.cpp): 8-float vectors, AVX2 + FMA + F16C, the same
// ISA as the baseline code.
#pragma GCC target("avx2,fma,f16c")
#define PAGEDKV_VARIANT_LEVEL 1
#include "cpu/variant/isa_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define PAGEDKV_ISA_NS avx2
