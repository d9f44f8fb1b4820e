// The SIMT emulator's stand-in for the CUDA runtime header: first on the include path of
// the emulated build only (setup.py), it gives the kernels and the glue the toolkit's own
// types (driver_types.h, vector_types.h) and the emulator's functions (simt/runtime.h).
#pragma once
#include "simt/runtime.h"
