// Settings and counters of the SIMT emulator, read and set by its private ops
// (simt/ops.cpp) and so by torch_pagedkv.emulation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedkv::simt {

// The order in which the runnable threads of a CTA run between two synchronization points:
// a seeded shuffle (each launch and CTA gets its own from the seed), thread 0 first, or the
// last thread first. A missing barrier between a writer and a reader of shared memory gives
// a wrong answer in forward or in reverse order, whichever runs the reader first.
enum class Order : int { kRandom = 0, kForward = 1, kReverse = 2 };

struct Settings {
  Order order = Order::kRandom;
  uint64_t seed = 0;
  int profile = 0;  // index into device profiles (device.cpp): 0 = H100 SXM, 1 = H200
};
Settings settings();
void set_settings(const Settings& s);

struct Counters {
  int64_t launches = 0, ctas = 0, threads = 0, barriers = 0, warp_ops = 0;
  std::vector<std::string> kernels;  // names of the launched kernels, in order (capped)
};
Counters counters();
void reset_counters();

// Device profile (device.cpp).
struct Profile {
  const char* name;
  int sms, max_threads_per_block, max_threads_per_sm, max_blocks_per_sm;
  int max_block_dim[3];
  int max_grid_dim[3];
  int smem_per_block, smem_per_block_optin, smem_per_sm, reserved_smem_per_block;
  int regs_per_sm, warp_size, major, minor;
  int64_t global_mem;
};
const Profile& profile();
int num_profiles();
const Profile& profile_at(int i);

// The largest dynamic shared memory a launch of `fn` may take (48 KiB unless raised by
// cudaFuncSetAttribute).
int max_dynamic_smem(const void* fn);

}  // namespace pagedkv::simt
