// csrc/cuda/decode_fp8_f16.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/decode_fp8_f16.cu"
