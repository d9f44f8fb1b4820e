// The SIMT emulator's device: an H100 SXM or H200 profile (control.h) that answers the
// device queries, function attributes and occupancy the glue asks for, and the copies of
// the runtime API (memory is the host's: the emulated device is the CPU).
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>

#include "simt/control.h"
#include "simt/runtime.h"

namespace pagedkv::simt {

cudaError_t take_last_error();
cudaError_t peek_last_error();

namespace {

// Published limits of compute capability 9.0 and of the two boards' SM counts.
const Profile kProfiles[] = {
    {"NVIDIA H100 80GB HBM3", 132, 1024, 2048, 32, {1024, 1024, 64}, {2147483647, 65535, 65535},
     48 * 1024, 232448, 233472, 1024, 65536, 32, 9, 0, int64_t(80) << 30},
    {"NVIDIA H200", 132, 1024, 2048, 32, {1024, 1024, 64}, {2147483647, 65535, 65535},
     48 * 1024, 232448, 233472, 1024, 65536, 32, 9, 0, int64_t(141) << 30},
};

std::mutex g_attr_mu;
std::map<const void*, int> g_max_dynamic_smem;

}  // namespace

const Profile& profile() { return kProfiles[std::clamp(settings().profile, 0, num_profiles() - 1)]; }
int num_profiles() { return int(sizeof(kProfiles) / sizeof(kProfiles[0])); }
const Profile& profile_at(int i) { return kProfiles[i]; }

int max_dynamic_smem(const void* fn) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = g_max_dynamic_smem.find(fn);
  return it == g_max_dynamic_smem.end() ? profile().smem_per_block : it->second;
}

}  // namespace pagedkv::simt

using pagedkv::simt::profile;

cudaError_t cudaGetLastError() { return pagedkv::simt::take_last_error(); }
cudaError_t cudaPeekAtLastError() { return pagedkv::simt::peek_last_error(); }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const auto& p = profile();
  std::memset(prop, 0, sizeof(*prop));
  std::strncpy(prop->name, p.name, sizeof(prop->name) - 1);
  prop->totalGlobalMem = size_t(p.global_mem);
  prop->sharedMemPerBlock = size_t(p.smem_per_block);
  prop->sharedMemPerBlockOptin = size_t(p.smem_per_block_optin);
  prop->sharedMemPerMultiprocessor = size_t(p.smem_per_sm);
  prop->reservedSharedMemPerBlock = size_t(p.reserved_smem_per_block);
  prop->regsPerBlock = p.regs_per_sm;
  prop->regsPerMultiprocessor = p.regs_per_sm;
  prop->warpSize = p.warp_size;
  prop->maxThreadsPerBlock = p.max_threads_per_block;
  prop->maxThreadsPerMultiProcessor = p.max_threads_per_sm;
  prop->maxBlocksPerMultiProcessor = p.max_blocks_per_sm;
  for (int i = 0; i < 3; ++i) {
    prop->maxThreadsDim[i] = p.max_block_dim[i];
    prop->maxGridSize[i] = p.max_grid_dim[i];
  }
  prop->multiProcessorCount = p.sms;
  prop->major = p.major;
  prop->minor = p.minor;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const auto& p = profile();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = p.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = p.smem_per_block_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = p.smem_per_block; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = p.smem_per_sm; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.max_threads_per_block; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = p.max_threads_per_sm; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = p.warp_size; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = p.max_grid_dim[0]; return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = p.max_grid_dim[1]; return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = p.max_grid_dim[2]; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // hints
  if (value < 0 || value > profile().smem_per_block_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(pagedkv::simt::g_attr_mu);
  pagedkv::simt::g_max_dynamic_smem[fn] = value;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* fn) {
  std::memset(attr, 0, sizeof(*attr));
  attr->maxThreadsPerBlock = profile().max_threads_per_block;  // registers are nvcc's to know
  attr->maxDynamicSharedSizeBytes = pagedkv::simt::max_dynamic_smem(fn);
  attr->ptxVersion = attr->binaryVersion = 90;
  return cudaSuccess;
}

// Occupancy from threads and shared memory alone (the profile has no register counts).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* fn, int threads,
                                                          size_t smem) {
  const auto& p = profile();
  if (threads <= 0 || threads > p.max_threads_per_block ||
      smem > size_t(pagedkv::simt::max_dynamic_smem(fn)))
    return cudaErrorInvalidValue;
  const int warps = (threads + 31) / 32;
  int n = std::min(p.max_blocks_per_sm, p.max_threads_per_sm / (warps * 32));
  n = std::min<int64_t>(n, p.smem_per_sm / int64_t(smem + p.reserved_smem_per_block));
  *blocks = n;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaHostGetDevicePointer(void** device, void* host, unsigned) {
  *device = host;
  return cudaSuccess;
}
