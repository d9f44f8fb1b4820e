// Runtime switches of the kernels. Each starts from its environment variable, read once
// per process at first use, and can be changed while running by the private op
// pagedkv::_set_knob (torch_pagedkv/knobs.py): an op call reads an atomic, never the
// environment.
#pragma once

#include <string>

namespace pagedkv {

enum class AttentionPath { kAuto, kDecode, kPrefill };

// PAGEDKV_GENERIC_KERNELS=1: the generic (run-time shape) kernels instead of the
// specialized ones (CUDA; the CPU kernels are all run-time shape), so benchmarks and
// tests can compare the two in one process.
bool generic_kernels_forced();
// PAGEDKV_ATTENTION_PATH=decode|prefill: the CUDA attention kernel to use whatever the
// batch (both are correct for any batch; tests cross-check them). kAuto: chosen by shape.
AttentionPath attention_path();
// PAGEDKV_DEBUG=1: the CUDA glue also runs the host-side index range checks.
bool debug_checks_enabled();
// PAGEDKV_DECODE_SPLITS=1|2|3|4|8|16: at most this many split-K decode CTAs per (row, kv
// head chunk), so each walks several partitions (tests cover that loop on small shapes);
// 0 (auto): decode_plan decides.
int decode_splits_cap();

// PAGEDKV_CPU_ISA=auto|avx2|avx512|avx512_bf16: the ISA variant of the CPU kernels
// (cpu/isa.h); "auto": the widest this CPU runs.
std::string cpu_isa();
// The CPU attention kernels' work tiling (cpu/attention.cpp plan_items); only the order
// of float additions depends on it, never what is computed.
struct CpuTiling {
  int vectors_per_head;  // PAGEDKV_CPU_VECTORS_PER_HEAD: causal items, per kv head
  int vectors_per_item;  // PAGEDKV_CPU_VECTORS_PER_ITEM: decode items across kv heads
  int prefix_vectors_per_head;  // PAGEDKV_CPU_PREFIX_VECTORS_PER_HEAD: causal=False tiles
  int64_t serial_products;  // PAGEDKV_CPU_SERIAL_PRODUCTS: at most this: no OpenMP region
};
CpuTiling cpu_tiling();

// A check of a knob's values beyond the list (the CPU kernels refuse an ISA variant this
// CPU cannot run): returns "" when `value` may be set, else why not. A library that
// registers none (the SIMT-emulated one) takes any listed value.
using KnobCheck = std::string (*)(const std::string& value);
void set_knob_check(const std::string& name, KnobCheck check);

// Sets knob `name` from its string form; returns the previous value in the same form.
// Raises RuntimeError on an unknown name or value.
std::string set_knob(const std::string& name, const std::string& value);

}  // namespace pagedkv
