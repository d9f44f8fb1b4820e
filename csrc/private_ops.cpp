// The private ops every build has (CUDA builds add cuda/private_ops.cpp). Not part of the
// public catalog (ops_catalog.cpp): they steer the kernels, they do not compute.
#include <torch/library.h>

#include "knobs.h"
#include "ops_namespace.h"

TORCH_LIBRARY_FRAGMENT(PAGEDKV_OPS_NS, m) {
  // Set a runtime switch (knobs.h) by name, e.g. ("generic_kernels", "1"); returns the
  // previous value. torch_pagedkv/knobs.py wraps it.
  m.def("_set_knob(str name, str value) -> str");
}

// No tensor arguments, so no backend key: the dispatcher calls this kernel.
TORCH_LIBRARY_IMPL(PAGEDKV_OPS_NS, CompositeExplicitAutograd, m) {
  m.impl("_set_knob", &pagedkv::set_knob);
}
