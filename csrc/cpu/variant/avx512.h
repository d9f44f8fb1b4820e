// Prologue of the avx512 variant of the CPU kernels (setup.py's generated wrappers include
// it first, then one cpu/kernels/*.cpp): 16-float vectors, AVX-512 F/BW/VL/DQ without
// AVX512_BF16 (the kernels' vdpbf16ps paths drop out). Its at::vec code lives in ATen's
// capability namespace at::vec::AVX512, which no other variant or baseline file uses.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#pragma GCC diagnostic ignored "-Wpsabi"  // ATen lambdas' static thunks miss the target
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
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define PAGEDKV_ISA_NS avx512
