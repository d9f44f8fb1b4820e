// Prologue of the avx512 variant of the CPU kernels (setup.py's generated wrappers include
// it first, then one cpu/kernels/*.cpp): 16-float vectors, AVX-512 F/BW/VL/DQ without
// AVX512_BF16 (the kernels' vdpbf16ps paths drop out). Its at::vec code lives in ATen's
// capability namespace at::vec::AVX512, which no other variant or baseline file uses.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic ignored "-Wpsabi"  // ATen lambdas' static thunks miss the target
#define PAGEDKV_VARIANT_LEVEL 2
#include "cpu/variant/isa_macros.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define PAGEDKV_ISA_NS avx512
