// csrc/cuda/cache_kernels.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/cache_kernels.cu"
