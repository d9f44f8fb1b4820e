// The one place where runtime head size and block size become template parameters.
// Torch-free, so both the CPU kernels and the CUDA launchers (.cu) use it.
//
// Specialized: head sizes 64/80/96/112/128/192/256 and block sizes 8/16/32; any other
// value maps to 0, which selects the generic kernel that reads the size at run time.
#pragma once

#include <type_traits>

namespace pagedkv {

template <int N>
using Int = std::integral_constant<int, N>;

template <typename F>
inline void dispatch_head_size(int head_size, F&& f) {
  switch (head_size) {
    case 64: f(Int<64>{}); break;
    case 80: f(Int<80>{}); break;
    case 96: f(Int<96>{}); break;
    case 112: f(Int<112>{}); break;
    case 128: f(Int<128>{}); break;
    case 192: f(Int<192>{}); break;
    case 256: f(Int<256>{}); break;
    default: f(Int<0>{}); break;
  }
}

template <typename F>
inline void dispatch_block_size(int block_size, F&& f) {
  switch (block_size) {
    case 8: f(Int<8>{}); break;
    case 16: f(Int<16>{}); break;
    case 32: f(Int<32>{}); break;
    default: f(Int<0>{}); break;
  }
}

// Both at once; `force_generic` selects the generic kernel (benchmarks compare the two).
template <typename F>
inline void dispatch_shape(int head_size, int block_size, bool force_generic, F&& f) {
  if (force_generic) {
    f(Int<0>{}, Int<0>{});
    return;
  }
  dispatch_head_size(head_size, [&](auto head) {
    dispatch_block_size(block_size, [&](auto block) { f(head, block); });
  });
}

}  // namespace pagedkv
