// The SIMT emulator's CUDA: the kernel language (thread indices, __syncthreads, warp
// shuffles, __ldg, dynamic shared memory) and the runtime calls the kernels and their glue
// make (launch, device queries, attributes, occupancy, copies), executed on the CPU.
// csrc/cuda compiles against this header instead of the toolkit's runtime when built as
// the emulated library (setup.py); the toolkit supplies the types (driver_types.h,
// vector_types.h) and cuda_fp16.h / cuda_bf16.h / cuda_fp8.h their host conversions.
//
// Every symbol here is hidden (the library is built with -fvisibility=hidden), so the real
// CUDA runtime loaded by torch in the same process is never confused with it.
#pragma once

#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Kernel qualifiers: plain host C++ here.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __forceinline__ inline __attribute__((always_inline))

namespace pagedkv::simt {

// ---- execution state of the running emulated thread (cta.cpp) ----
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void* dynamic_smem();

[[noreturn]] void fail(const char* file, int line, const char* what);

void syncthreads(const char* file, int line);
enum class Shfl : int { kXor, kDown, kUp, kIdx, kSyncwarp };
uint64_t warp_op(const char* file, int line, Shfl kind, unsigned mask, uint64_t value, int arg,
                 int width);

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_op(file, line, Shfl::kSyncwarp, mask, 0, 0, 32);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a 32/64-bit value");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
inline T shfl(const char* file, int line, Shfl kind, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_op(file, line, kind, mask, to_bits(v), arg, width));
}

// __ldg: a read-only load that faults on a misaligned address, as the GPU does.
template <typename T>
inline T ldg(const char* file, int line, const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fail(file, line, "misaligned __ldg");
  return *p;
}

// The last launch failure's description (what cudaGetErrorString cannot say).
const char* last_failure();

// ---- launches (cta.cpp) ----
struct KernelBody {
  void (*run)(const void* closure);
  const void* closure;
};
cudaError_t launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
                   KernelBody body);

// Runs `kernel` over the grid with these arguments, converted once to the kernel's
// parameter types; each emulated thread calls the kernel with a copy of them.
template <typename... P, typename... A>
cudaError_t launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                          size_t smem, A&&... args) {
  struct Closure {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } c{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  KernelBody body{[](const void* p) {
                    const Closure* cl = static_cast<const Closure*>(p);
                    std::apply(cl->kernel, cl->params);
                  },
                  &c};
  return launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem, body);
}

}  // namespace pagedkv::simt

#define threadIdx (::pagedkv::simt::thread_idx())
#define blockIdx (::pagedkv::simt::block_idx())
#define blockDim (::pagedkv::simt::block_dim())
#define gridDim (::pagedkv::simt::grid_dim())
#define __syncthreads() ::pagedkv::simt::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::pagedkv::simt::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
  ::pagedkv::simt::shfl(__FILE__, __LINE__, ::pagedkv::simt::Shfl::kXor, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
  ::pagedkv::simt::shfl(__FILE__, __LINE__, ::pagedkv::simt::Shfl::kDown, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
  ::pagedkv::simt::shfl(__FILE__, __LINE__, ::pagedkv::simt::Shfl::kUp, mask, v, __VA_ARGS__)
#define __shfl_sync(mask, v, ...) \
  ::pagedkv::simt::shfl(__FILE__, __LINE__, ::pagedkv::simt::Shfl::kIdx, mask, v, __VA_ARGS__)
#define __ldg(p) ::pagedkv::simt::ldg(__FILE__, __LINE__, p)

// Device math the kernels use that host C++ spells otherwise.
inline float __uint_as_float(unsigned x) { return ::pagedkv::simt::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return unsigned(::pagedkv::simt::to_bits(x)); }
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
using std::isnan;

// ---- the CUDA runtime calls csrc/cuda makes (device.cpp answers from the H100/H200
// profile) ----
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* fn);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* fn,
                                                          int threads, size_t smem);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaHostGetDevicePointer(void** device, void* host, unsigned flags);
