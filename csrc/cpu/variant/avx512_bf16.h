// Prologue of the avx512_bf16 variant of the CPU kernels (setup.py's generated wrappers
// include it first, then one cpu/kernels/*.cpp): the avx512 variant plus AVX512_BF16, so
// the kernels' __AVX512BF16__ paths (vdpbf16ps) compile in. CPU_CAPABILITY=AVX512_BF16
// gives its at::vec code a namespace of its own too (ATen uses the macro only as the
// namespace name), so no inline function is shared with the avx512 variant.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#pragma GCC diagnostic ignored "-Wpsabi"  // ATen lambdas' static thunks miss the target
#define PAGEDKV_VARIANT_LEVEL 3
#include "cpu/variant/isa_macros.h"
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define PAGEDKV_ISA_NS avx512_bf16
