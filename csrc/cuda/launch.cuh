// How a kernel is launched and how it names its dynamic shared memory: the two spellings
// the kernels share between nvcc (sm_90) and the SIMT emulator (csrc/simt, the same kernel
// source compiled by the host compiler and run on the CPU; docs/emulation.md).
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace pagedkv::cuda {

// Launches kernel<<<grid, block, smem, stream>>>(args...) and returns the launch's error;
// `name` is what the emulator's errors call the kernel.
template <typename... P, typename... A>
inline cudaError_t launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                                 size_t smem, cudaStream_t stream, A&&... args) {
#ifdef __CUDACC__
  (void)name;
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
#else
  (void)stream;
  simt::launch_kernel(name, kernel, grid, block, smem, std::forward<A>(args)...);
#endif
  return cudaGetLastError();
}

}  // namespace pagedkv::cuda

// The kernel's dynamic shared memory as a T array `name` (16-byte aligned).
#ifdef __CUDACC__
#define PAGEDKV_DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#else
#define PAGEDKV_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(::pagedkv::simt::dynamic_smem())
#endif
