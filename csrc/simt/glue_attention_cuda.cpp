// The CUDA glue file compiled for the SIMT emulator (setup.py).
#include "cuda/attention_cuda.cpp"
