#include "knobs.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace pagedkv {
namespace {

struct Knob {
  const char* name;  // as _set_knob and torch_pagedkv.knobs spell it
  const char* env;
  std::vector<std::string> values;  // a value is held as its index here; [0] is the default
  std::atomic<int> value{0};
  std::atomic<KnobCheck> check{nullptr};
};

enum KnobId {
  kGenericKernels, kAttentionPath, kDebug, kDecodeSplits, kCpuIsa, kCpuVectorsPerHead,
  kCpuVectorsPerItem, kCpuPrefixVectorsPerHead, kCpuSerialProducts, kNumKnobs
};

bool is_flag(const Knob& k) { return k.values == std::vector<std::string>{"0", "1"}; }

// The environment's value as an index into k.values. A flag is on when its variable is
// set, non-empty and not "0" (PAGEDKV_DEBUG=true works as well as =1); any other knob
// takes one of its values verbatim and keeps its default otherwise (an unknown
// PAGEDKV_ATTENTION_PATH has always meant auto).
int from_env(const Knob& k) {
  const char* v = std::getenv(k.env);
  if (v == nullptr) return 0;
  if (is_flag(k)) return v[0] != '\0' && v[0] != '0' ? 1 : 0;
  for (size_t i = 0; i < k.values.size(); ++i) {
    if (k.values[i] == v) return int(i);
  }
  return 0;
}

Knob* knobs() {
  static Knob table[kNumKnobs] = {
      {"generic_kernels", "PAGEDKV_GENERIC_KERNELS", {"0", "1"}},
      {"attention_path", "PAGEDKV_ATTENTION_PATH", {"auto", "decode", "prefill"}},
      {"debug", "PAGEDKV_DEBUG", {"0", "1"}},
      {"decode_splits", "PAGEDKV_DECODE_SPLITS", {"auto", "1", "2", "3", "4", "8", "16"}},
      {"cpu_isa", "PAGEDKV_CPU_ISA", {"auto", "avx2", "avx512", "avx512_bf16"}},
      {"cpu_vectors_per_head", "PAGEDKV_CPU_VECTORS_PER_HEAD", {"32", "8", "16", "64", "128"}},
      {"cpu_vectors_per_item", "PAGEDKV_CPU_VECTORS_PER_ITEM",
       {"64", "16", "32", "128", "256"}},
      {"cpu_prefix_vectors_per_head", "PAGEDKV_CPU_PREFIX_VECTORS_PER_HEAD",
       {"256", "64", "128", "512"}},
      {"cpu_serial_products", "PAGEDKV_CPU_SERIAL_PRODUCTS",
       {"2048", "0", "512", "8192", "32768"}},
  };
  // A function-local static's initializer runs once, thread-safely: the environment is
  // read at the first knob access and never again.
  static const bool from_environment = [] {
    for (Knob& k : table) k.value.store(from_env(k));
    return true;
  }();
  (void)from_environment;
  return table;
}

int read(KnobId id) { return knobs()[id].value.load(std::memory_order_relaxed); }
const std::string& value_of(KnobId id) { return knobs()[id].values[read(id)]; }
int number(KnobId id) { return std::stoi(value_of(id)); }

std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

}  // namespace

bool generic_kernels_forced() { return read(kGenericKernels) == 1; }
bool debug_checks_enabled() { return read(kDebug) == 1; }
AttentionPath attention_path() { return AttentionPath(read(kAttentionPath)); }
int decode_splits_cap() {
  const int i = read(kDecodeSplits);
  return i == 0 ? 0 : std::stoi(knobs()[kDecodeSplits].values[i]);
}

std::string cpu_isa() { return value_of(kCpuIsa); }
CpuTiling cpu_tiling() {
  return {number(kCpuVectorsPerHead), number(kCpuVectorsPerItem),
          number(kCpuPrefixVectorsPerHead), number(kCpuSerialProducts)};
}

void set_knob_check(const std::string& name, KnobCheck check) {
  for (int i = 0; i < kNumKnobs; ++i) {
    if (name == knobs()[i].name) knobs()[i].check.store(check);
  }
}

std::string set_knob(const std::string& name, const std::string& value) {
  const char* op = "_set_knob";
  Knob* table = knobs();
  std::vector<std::string> names;
  Knob* k = nullptr;
  for (int i = 0; i < kNumKnobs; ++i) {
    names.push_back(table[i].name);
    if (name == table[i].name) k = &table[i];
  }
  TORCH_CHECK(k != nullptr, op, ": name must be one of ", joined(names), ", got '", name, "'");
  size_t index = 0;
  while (index < k->values.size() && k->values[index] != value) ++index;
  TORCH_CHECK(index < k->values.size(), op, ": value of ", name, " must be one of ",
              joined(k->values), ", got '", value, "'");
  if (const KnobCheck check = k->check.load()) {
    const std::string problem = check(value);
    TORCH_CHECK(problem.empty(), op, ": ", problem);
  }
  return k->values[k->value.exchange(int(index))];
}

}  // namespace pagedkv
