// The op catalog, the common private ops and the knobs, for the SIMT-emulated library.
#include "ops_catalog.cpp"
#include "private_ops.cpp"
#include "knobs.cpp"
