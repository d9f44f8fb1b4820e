// The CUDA glue file compiled for the SIMT emulator (setup.py).
#include "cuda/register_cuda.cpp"
