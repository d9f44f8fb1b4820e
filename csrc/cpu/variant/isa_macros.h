// The ISA macros of a variant's #pragma GCC target, for the variant prologues (avx2.h,
// avx512.h, avx512_bf16.h), which define PAGEDKV_VARIANT_LEVEL (1: AVX2 + FMA + F16C;
// 2: + AVX-512 F/BW/VL/DQ; 3: + AVX512_BF16) and include this after their pragma. g++
// does not define the ISA macros for #pragma GCC target (gcc does): defined here, the
// headers that test them (the kernels' __AVX512BF16__ paths) see the target.
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#if PAGEDKV_VARIANT_LEVEL >= 2
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#if PAGEDKV_VARIANT_LEVEL >= 3
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#endif
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY_AVX512
