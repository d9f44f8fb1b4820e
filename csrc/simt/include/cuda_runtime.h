// The SIMT emulator's stand-in for cuda_runtime.h (see cuda_runtime_api.h beside it).
#pragma once
#include "simt/runtime.h"
