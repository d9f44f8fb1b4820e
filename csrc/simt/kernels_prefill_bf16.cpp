// csrc/cuda/prefill_bf16.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/prefill_bf16.cu"
