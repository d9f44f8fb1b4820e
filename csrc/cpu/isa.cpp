// Which ISA variants of the CPU kernels this library holds, which of them this CPU runs,
// and the one the knob cpu_isa makes active (cpu/isa.h). Baseline code: it runs on any
// CPU the library loads on, and asks the CPU itself (cpuid, with the OS's register-state
// support) before any variant's instruction executes.
#include "cpu/isa.h"

#include "knobs.h"

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace pagedkv::cpu {
namespace {

struct Variant {
  const char* name;
  std::vector<std::string> flags;  // as /proc/cpuinfo names them
  Kernels kernels;
};

#define PAGEDKV_KERNELS(ns) \
  Kernels{#ns, &ns::attention_float, &ns::attention_half, &ns::attention_bfloat16, \
          &ns::attention_fp8, &ns::write_cache}

// Narrowest first: "auto" takes the last runnable one.
const std::vector<Variant>& compiled() {
  static const std::vector<Variant> variants = {
#if defined(PAGEDKV_CPU_X86_VARIANTS)
      {"avx2", {"avx2", "fma", "f16c"}, PAGEDKV_KERNELS(avx2)},
      {"avx512", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
       PAGEDKV_KERNELS(avx512)},
      {"avx512_bf16",
       {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
       PAGEDKV_KERNELS(avx512_bf16)},
#else
      {"generic", {}, PAGEDKV_KERNELS(generic)},
#endif
  };
  return variants;
}

bool cpu_has(const std::string& flag) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (flag == "avx2") return __builtin_cpu_supports("avx2");
  if (flag == "fma") return __builtin_cpu_supports("fma");
  if (flag == "f16c") return __builtin_cpu_supports("f16c");
  if (flag == "avx512f") return __builtin_cpu_supports("avx512f");
  if (flag == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (flag == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (flag == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (flag == "avx512_bf16") return __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

std::vector<std::string> missing_flags(const Variant& v) {
  std::vector<std::string> missing;
  for (const std::string& f : v.flags) {
    if (!cpu_has(f)) missing.push_back(f);
  }
  return missing;
}

const Variant* find(const std::string& name) {
  for (const Variant& v : compiled()) {
    if (name == v.name) return &v;
  }
  return nullptr;
}

// The widest variant this CPU runs (the library's AVX2 baseline is checked at load).
const Variant& widest() {
  static const Variant* best = [] {
    const Variant* b = &compiled().front();
    for (const Variant& v : compiled()) {
      if (missing_flags(v).empty()) b = &v;
    }
    return b;
  }();
  return *best;
}

std::string joined(const std::vector<std::string>& xs, const char* sep) {
  std::string s;
  for (const std::string& x : xs) s += (s.empty() ? "" : sep) + x;
  return s;
}

// Why cpu_isa=value cannot be active here; "" when it can.
std::string problem(const std::string& value) {
  if (value == "auto") return "";
  const Variant* v = find(value);
  std::vector<std::string> names;
  for (const Variant& c : compiled()) names.push_back(c.name);
  if (v == nullptr) {
    return "cpu_isa=" + value + " (PAGEDKV_CPU_ISA) is not compiled into this library (it has " +
           joined(names, ", ") + ")";
  }
  const std::vector<std::string> missing = missing_flags(*v);
  if (missing.empty()) return "";
  return "cpu_isa=" + value + " (PAGEDKV_CPU_ISA) cannot run on this CPU: it lacks the CPU " +
         "flags " + joined(missing, " ") + " (it can run auto, or one of the variants " +
         "torch_pagedkv.knobs.cpu_isa_info() lists as runnable)";
}

const bool registered = [] {
  set_knob_check("cpu_isa", &problem);
  return true;
}();

std::string json_list(const std::vector<std::string>& xs) {
  std::string s = "[";
  for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", \"" : "\"") + xs[i] + "\"";
  return s + "]";
}

}  // namespace

const Kernels& kernels() {
  (void)registered;
  const std::string name = cpu_isa();
  if (name == "auto") return widest().kernels;
  const std::string why = problem(name);
  TORCH_CHECK(why.empty(), why);
  return find(name)->kernels;
}

std::string isa_info() {
  std::vector<std::string> names, runnable;
  std::string missing;
  for (const Variant& v : compiled()) {
    names.push_back(v.name);
    const std::vector<std::string> lacks = missing_flags(v);
    if (lacks.empty()) runnable.push_back(v.name);
    missing += std::string(missing.empty() ? "" : ", ") + "\"" + v.name + "\": " + json_list(lacks);
  }
  const std::string name = cpu_isa();
  const std::string active = name == "auto" ? widest().name : name;
  return "{\"compiled\": " + json_list(names) + ", \"runnable\": " + json_list(runnable) +
         ", \"active\": \"" + active + "\", \"missing\": {" + missing + "}}";
}

}  // namespace pagedkv::cpu
