// Prologue of the generic variant of the CPU kernels (non-x86 builds: at::vec's scalar
// code, 8 float lanes).
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#undef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY DEFAULT
#define PAGEDKV_ISA_NS generic
