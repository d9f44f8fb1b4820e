// The CUDA glue file compiled for the SIMT emulator (setup.py).
#include "cuda/cache_ops_cuda.cpp"
