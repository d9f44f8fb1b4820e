// The CUDA glue's view of the device: c10's CUDA runtime in the real build; in the SIMT-
// emulated build (PAGEDKV_SIMT, csrc/simt) one emulated device whose memory is the CPU's,
// so the glue runs unchanged on CPU tensors and only who executes the threads differs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#ifdef PAGEDKV_SIMT
#include <c10/util/Exception.h>

#include "simt/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pagedkv::cuda {

#ifdef PAGEDKV_SIMT
// Where the kernels' memory lives, as error messages say it.
constexpr const char* kDeviceWord = "the CPU (the SIMT emulator's device)";
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
// Host memory apart from the device's: none (every CPU tensor is device memory here).
inline bool in_host_memory(const at::Tensor&) { return false; }
inline int device_index(const at::Device&) { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool capturing() { return false; }
inline int device_count() { return 1; }
inline int current_device() { return 0; }
#define PAGEDKV_CUDA_CHECK(expr)                                                              \
  do {                                                                                        \
    const cudaError_t pagedkv_err_ = (expr);                                                  \
    TORCH_CHECK(pagedkv_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(pagedkv_err_), \
                " (SIMT emulator: ", ::pagedkv::simt::last_failure(), ")");                   \
  } while (0)
#else
constexpr const char* kDeviceWord = "a CUDA device";
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
inline bool in_host_memory(const at::Tensor& t) { return t.is_cpu(); }
inline int device_index(const at::Device& d) { return d.index(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}
inline int device_count() { return c10::cuda::device_count(); }
inline int current_device() { return c10::cuda::current_device(); }
#define PAGEDKV_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#endif

}  // namespace pagedkv::cuda
