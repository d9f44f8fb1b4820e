// The CUDA glue file compiled for the SIMT emulator (setup.py).
#include "cuda/private_ops.cpp"
