// csrc/cuda/decode_fp8_f32.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/decode_fp8_f32.cu"
