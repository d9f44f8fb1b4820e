// The argument checks, for the SIMT-emulated library.
#include "checks.cpp"
