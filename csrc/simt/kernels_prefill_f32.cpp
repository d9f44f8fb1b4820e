// csrc/cuda/prefill_f32.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/prefill_f32.cu"
