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

// Sets knob `name` from its string form; returns the previous value in the same form.
// Raises RuntimeError on an unknown name or value.
std::string set_knob(const std::string& name, const std::string& value);

}  // namespace pagedkv
