// Launch configurations of the CUDA kernels: a table keyed by (GPU name, head size,
// cache dtype, block size), filled from torch_pagedkv/configs/launch_configs.json by
// torch_pagedkv/tuning/table.py (through the private op pagedkv::_set_launch_config) at
// the table's first use, with a heuristic for every key the table lacks. This header is
// torch-free.
//
// A config changes only launch parameters whose effect is fixed at launch (threads, the
// decode partition size), never the results beyond float rounding; and it is looked up
// from shapes and the device, never from metadata, so graphs stay replayable.
#pragma once

#include <string>

#include "cuda/kernels.h"

namespace pagedkv::cuda {

// Name of the dtype as torch prints it without "torch.": float32, float16, bfloat16,
// float8_e4m3fn, float8_e5m2. Returns false for any other string.
bool parse_dtype(const std::string& name, DType* out);
const char* dtype_name(DType d);

// The fallback for keys missing from the table. Valid for every head size, dtype and
// block size the ops accept.
LaunchConfig heuristic_config(int head_size, DType cache, int block_size);

// Empty string when `c` is usable, else what is wrong with it.
std::string config_error(const LaunchConfig& c);

// Table access (thread-safe). The first access of the process installs the shipped
// table (see install_once in launch_config.cpp). set_config throws
// std::invalid_argument on a bad config.
void set_config(const std::string& device_name, int head_size, DType cache, int block_size,
                const LaunchConfig& c);
void clear_configs();
// The table's entry, or the heuristic; *from_table says which.
LaunchConfig find_config(const std::string& device_name, int head_size, DType cache,
                         int block_size, bool* from_table);
// The same for a CUDA device index (its name read once per device).
LaunchConfig config_for_device(int device, int head_size, DType cache, int block_size);
std::string device_name(int device);
// The device's number of SMs (read once per device; 1 if it cannot be read).
int sm_count(int device);

}  // namespace pagedkv::cuda
