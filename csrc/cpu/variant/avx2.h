// Prologue of the avx2 variant of the CPU kernels (setup.py's generated wrappers include
// it first, then one cpu/kernels/*.cpp): 8-float vectors, AVX2 + FMA + F16C, the same
// ISA as the baseline code.
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros for #pragma GCC target (gcc does): define them,
// so headers that test them (the kernels' __AVX512BF16__ paths) see the target.
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define PAGEDKV_ISA_NS avx2
