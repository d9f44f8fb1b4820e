// The CUDA glue file compiled for the SIMT emulator (setup.py).
#include "cuda/launch_config.cpp"
