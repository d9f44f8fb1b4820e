// The SIMT emulator's own private ops (torch.ops.pagedkv_simt._simt_*): its settings,
// counters and device profiles, wrapped by torch_pagedkv.emulation.
#include <torch/library.h>

#include <string>
#include <vector>

#include "simt/control.h"

namespace pagedkv::simt {
namespace {

const char* const kOrders[] = {"random", "forward", "reverse"};

void configure(const std::string& order, int64_t seed, int64_t profile) {
  Settings s;
  int o = -1;
  for (int i = 0; i < 3; ++i)
    if (order == kOrders[i]) o = i;
  TORCH_CHECK(o >= 0, "_simt_configure: order must be random, forward or reverse, got '", order, "'");
  TORCH_CHECK(profile >= 0 && profile < num_profiles(), "_simt_configure: profile must be in [0, ",
              num_profiles(), "), got ", profile);
  s.order = Order(o);
  s.seed = uint64_t(seed);
  s.profile = int(profile);
  set_settings(s);
}

std::vector<std::string> current() {
  const Settings s = settings();
  return {kOrders[int(s.order)], std::to_string(int64_t(s.seed)), std::to_string(s.profile),
          profile().name};
}

std::vector<int64_t> counter_values() {
  const Counters c = counters();
  return {c.launches, c.ctas, c.threads, c.barriers, c.warp_ops};
}

std::vector<std::string> kernel_log() { return counters().kernels; }

std::vector<std::string> profile_names() {
  std::vector<std::string> out;
  for (int i = 0; i < num_profiles(); ++i) out.push_back(profile_at(i).name);
  return out;
}

}  // namespace
}  // namespace pagedkv::simt

TORCH_LIBRARY_FRAGMENT(pagedkv_simt, m) {
  // Thread order between synchronization points, its seed, and the device profile.
  m.def("_simt_configure(str order, int seed, int profile) -> ()");
  // [order, seed, profile index, profile name] in force.
  m.def("_simt_settings() -> str[]");
  // [launches, ctas, threads, barriers, warp_ops] since the last reset, and the kernels run.
  m.def("_simt_counters() -> int[]");
  m.def("_simt_kernels() -> str[]");
  m.def("_simt_reset_counters() -> ()");
  m.def("_simt_profiles() -> str[]");
}

TORCH_LIBRARY_IMPL(pagedkv_simt, CompositeExplicitAutograd, m) {
  m.impl("_simt_configure", &pagedkv::simt::configure);
  m.impl("_simt_settings", &pagedkv::simt::current);
  m.impl("_simt_counters", &pagedkv::simt::counter_values);
  m.impl("_simt_kernels", &pagedkv::simt::kernel_log);
  m.impl("_simt_reset_counters", &pagedkv::simt::reset_counters);
  m.impl("_simt_profiles", &pagedkv::simt::profile_names);
}
