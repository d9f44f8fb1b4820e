// The CPU kernels' ISA variants. The kernel sources (cpu/kernels/) are compiled once per
// variant (setup.py: avx2, avx512 and avx512_bf16 on x86-64, generic elsewhere), each
// in its own namespace pagedkv::cpu::<variant>; the ISA-agnostic code (validation,
// planning, registration: baseline AVX2) calls the active one through `kernels()`,
// which the knob cpu_isa (PAGEDKV_CPU_ISA) selects at run time.
#pragma once

#include "cpu/attention_cpu.h"

#include <string>
#include <vector>

namespace pagedkv::cpu {

enum class CacheKind { kSame, kE4m3, kE5m2 };  // the cache dtype of write_cache vs its input

// reshape_and_cache's writes, validated (cache_ops.cpp): token i's key/value rows go to
// slot slots[i] (negative: skipped) of the contiguous caches.
struct CacheWriteArgs {
  const char* key;
  const char* value;
  int64_t key_stride, value_stride;  // bytes from one token's row to the next
  char* key_cache;
  char* value_cache;
  const int64_t* slots;
  int64_t num_tokens;
  int64_t row;  // elements per token: num_kv_heads * head_size
  int64_t elem_size;  // bytes per key/value element
  QueryKind in;  // the key/value dtype
  CacheKind cache;
  float k_scale, v_scale;  // fp8 caches only
};

// One variant's entry points (one translation unit each, so they compile in parallel).
#define PAGEDKV_CPU_KERNEL_ENTRY_POINTS()                                                   \
  void attention_float(const AttnArgs& a, const std::vector<WorkItem>& items);             \
  void attention_half(const AttnArgs& a, const std::vector<WorkItem>& items);              \
  void attention_bfloat16(const AttnArgs& a, const std::vector<WorkItem>& items);          \
  void attention_fp8(const AttnArgs& a, const std::vector<WorkItem>& items, QueryKind q,   \
                     Fp8Kind c);                                                           \
  void write_cache(const CacheWriteArgs& a);

namespace avx2 { PAGEDKV_CPU_KERNEL_ENTRY_POINTS() }
namespace avx512 { PAGEDKV_CPU_KERNEL_ENTRY_POINTS() }
namespace avx512_bf16 { PAGEDKV_CPU_KERNEL_ENTRY_POINTS() }
namespace generic { PAGEDKV_CPU_KERNEL_ENTRY_POINTS() }

struct Kernels {
  const char* isa;
  void (*attention_float)(const AttnArgs&, const std::vector<WorkItem>&);
  void (*attention_half)(const AttnArgs&, const std::vector<WorkItem>&);
  void (*attention_bfloat16)(const AttnArgs&, const std::vector<WorkItem>&);
  void (*attention_fp8)(const AttnArgs&, const std::vector<WorkItem>&, QueryKind, Fp8Kind);
  void (*write_cache)(const CacheWriteArgs&);
};

// The variant the knob cpu_isa names (auto: the widest this CPU runs). Raises when it
// names one this CPU cannot run (set from PAGEDKV_CPU_ISA; _set_knob refuses those).
const Kernels& kernels();

// {"compiled": [...], "runnable": [...], "active": "...", "missing": {variant: [CPU
// flags this CPU lacks for it]}} as JSON (the private op _cpu_isa_info;
// torch_pagedkv.knobs.cpu_isa_info).
std::string isa_info();

}  // namespace pagedkv::cpu
