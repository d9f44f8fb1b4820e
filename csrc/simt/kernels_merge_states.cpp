// csrc/cuda/merge_states.cu compiled by the host compiler for the SIMT emulator (setup.py).
#include "cuda/merge_states.cu"
