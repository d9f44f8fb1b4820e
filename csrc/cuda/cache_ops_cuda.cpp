// reshape_and_cache, copy_blocks and swap_blocks, CUDA backend.
//
// Index tensors are read where they live: a device-resident slot mapping, block table or
// block mapping is only ever read by kernels (which skip out-of-range entries), so the
// ops never synchronize and are capturable. A host-resident block mapping is free to
// read on the host: it is range-checked there before anything is copied.
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "checks.h"
#include "knobs.h"
#include "cuda/device.h"
#include "cuda/launch_config.h"
#include "cuda/ops_cuda.h"

namespace pagedkv::cuda {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::ScalarType::Float8_e4m3fn: return DType::kFp8E4M3;
    case at::ScalarType::Float8_e5m2: return DType::kFp8E5M2;
    default: return DType::kFloat32;
  }
}

at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFp8E4M3: return at::ScalarType::Float8_e4m3fn;
    case DType::kFp8E5M2: return at::ScalarType::Float8_e5m2;
    default: return at::kFloat;
  }
}

bool debug_range_checks() {
  // Range checks copy index tensors to the host (a synchronization), which a capturing
  // stream forbids: during capture they are skipped and the kernels' own bounds checks
  // (skip, never read out of range) remain.
  return debug_checks_enabled() && !capturing();
}

void check_aligned(const char* op, const char* name, const at::Tensor& t, int64_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, op, ": ", name,
              " data must be ", bytes, "-byte aligned for the CUDA kernel (a view at element "
              "offset ", t.storage_offset(), " is not)");
}

namespace {

// Copies `mapping` to `device` when it is elsewhere. From pageable host memory the copy
// is staged before this returns, so the caller may reuse its tensor at once; under CUDA
// graph capture pass the mapping on the device instead (a capture cannot read pageable
// host memory, and a captured copy would freeze the mapping's values).
at::Tensor mapping_on(const at::Tensor& mapping, const at::Device& device) {
  const at::Tensor m = mapping.contiguous();
  return m.device() == device ? m : m.to(device, /*non_blocking=*/true);
}

int64_t block_bytes_of(const at::Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0) * int64_t(t.element_size());
}

// Device pointer of a tensor in pinned host memory: with unified addressing it is the
// host pointer; asked of the runtime so a non-mapped allocation fails loudly.
char* device_view_of_pinned(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_pinned(), op, ": ", name, " is on the CPU and block_mapping on ",
              "cuda: a CPU cache must then be in pinned memory (tensor.pin_memory()), or pass "
              "block_mapping on the CPU");
  char* base = static_cast<char*>(t.storage().mutable_data());
  void* dbase = nullptr;
  const cudaError_t e = cudaHostGetDevicePointer(&dbase, base, 0);
  if (e != cudaSuccess) cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, op, ": ", name, " is pinned but not mapped into the device "
              "address space (", cudaGetErrorString(e), "); pass block_mapping on the CPU");
  return static_cast<char*>(dbase) + (static_cast<char*>(t.data_ptr()) - base);
}

// A CPU dst has no stream order: its reader is the host, which expects the op's result
// on return, as for any op writing a CPU tensor. So a swap into CPU memory waits for its
// copies, except while capturing a graph (which cannot wait; the replaying caller
// synchronizes). A swap into GPU memory never waits: later kernels on the stream see it.
void finish_cpu_write(const at::Tensor& dst, cudaStream_t stream) {
  if (in_host_memory(dst) && !capturing()) {
    PAGEDKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
}

}  // namespace

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale) {
  const char* op = "reshape_and_cache";
  const WriteDims d = validate_reshape_and_cache(key, value, key_cache, value_cache,
                                                 slot_mapping, k_scale, v_scale);
  TORCH_CHECK(on_device(key_cache), op, ": the CUDA kernel needs key_cache on ", kDeviceWord,
              ", got ", key_cache.device());
  const DeviceGuard guard(key_cache.device());
  const int64_t num_slots = d.cache.num_blocks * d.cache.block_size;
  if (debug_range_checks()) check_slot_ranges(slot_mapping.cpu(), num_slots);
  if (d.num_tokens == 0) return;

  const bool fp8 = is_fp8(key_cache.scalar_type());
  const at::Tensor slots = slot_mapping.contiguous();
  WriteParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride_tok = key.stride(0);
  p.value_stride_tok = value.stride(0);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.slot_mapping = slots.data_ptr<int64_t>();
  p.k_scale = fp8 && k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 && v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  p.num_tokens = d.num_tokens;
  p.num_slots = num_slots;
  p.row_elems = d.cache.num_kv_heads * d.cache.head_size;

  const LaunchConfig cfg =
      config_for_device(device_index(key_cache.device()), int(d.cache.head_size),
                        dtype_of(key_cache.scalar_type()), int(d.cache.block_size));
  PAGEDKV_CUDA_CHECK(launch_reshape_and_cache(p, dtype_of(key.scalar_type()),
                                              dtype_of(key_cache.scalar_type()),
                                              cfg.write_threads, current_stream()));
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches,
                 const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  const int64_t n = validate_copy_blocks(key_caches, value_caches, block_mapping);
  if (key_caches.empty()) return;
  const at::Device device = key_caches[0].device();
  TORCH_CHECK(on_device(key_caches[0]), op, ": the CUDA kernel needs the caches on ", kDeviceWord,
              ", got ", device);
  TORCH_CHECK(in_host_memory(block_mapping) || block_mapping.device() == device, op,
              ": block_mapping must be on the CPU or on ", device, ", got ",
              block_mapping.device());
  const DeviceGuard guard(device);
  if (in_host_memory(block_mapping) || debug_range_checks()) {
    const at::Tensor host = block_mapping.cpu();
    for (size_t l = 0; l < key_caches.size(); ++l)
      check_block_mapping_ranges(op, host, key_caches[l].size(0), key_caches[l].size(0),
                                 /*in_place=*/true);
  }
  if (n == 0) return;
  const at::Tensor mapping = mapping_on(block_mapping, device);
  cudaStream_t stream = current_stream();
  // The layers' pointers go to the kernel as a by-value parameter, kMaxCopyLayers per
  // launch (one launch for any common model): no pointer tensor is built, copied to the
  // device or cached, and a captured graph holds the pointers in its kernel node.
  for (size_t first = 0; first < key_caches.size(); first += kMaxCopyLayers) {
    CopyLayers layers{};
    layers.num_layers = int(std::min<size_t>(kMaxCopyLayers, key_caches.size() - first));
    for (int i = 0; i < layers.num_layers; ++i) {
      const at::Tensor& k = key_caches[first + i];
      const at::Tensor& v = value_caches[first + i];
      layers.layer[i] = CopyLayer{static_cast<char*>(k.data_ptr()), static_cast<char*>(v.data_ptr()),
                                  k.size(0), block_bytes_of(k)};
    }
    PAGEDKV_CUDA_CHECK(launch_copy_blocks(layers, mapping.data_ptr<int64_t>(), n, stream));
  }
}

void swap_blocks(const at::Tensor& src, at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  const int64_t n = validate_swap_blocks(src, dst, block_mapping);
  TORCH_CHECK(on_device(src) || on_device(dst), op, ": the CUDA kernel needs src or dst on ",
              kDeviceWord, ", got src on ", src.device(), " and dst on ", dst.device(),
              " (pass block_mapping on the CPU to copy between CPU tensors)");
  TORCH_CHECK(!(on_device(src) && on_device(dst)) || src.device() == dst.device(), op,
              ": src and dst on different GPUs are not supported, got ", src.device(), " and ",
              dst.device());
  TORCH_CHECK((on_device(src) || src.is_cpu()) && (on_device(dst) || dst.is_cpu()), op,
              ": src and dst must be on CUDA or the CPU, got ", src.device(), " and ", dst.device());
  const at::Device device = on_device(dst) ? dst.device() : src.device();
  const DeviceGuard guard(device);
  const int64_t bytes = block_bytes_of(src);
  cudaStream_t stream = current_stream();

  if (in_host_memory(block_mapping)) {
    // The mapping is host data: check it, then one cudaMemcpyAsync per run of consecutive
    // pairs (DMA engines, any direction, pinned or pageable host memory).
    const at::Tensor m = block_mapping.contiguous();
    check_block_mapping_ranges(op, m, src.size(0), dst.size(0),
                               /*in_place=*/src.is_alias_of(dst));
    if (n == 0 || bytes == 0) return;
    const int64_t* pairs = m.data_ptr<int64_t>();
    const char* s = static_cast<const char*>(src.data_ptr());
    char* dp = static_cast<char*>(dst.data_ptr());
    for (int64_t i = 0; i < n;) {
      int64_t run = 1;
      while (i + run < n && pairs[2 * (i + run)] == pairs[2 * i] + run &&
             pairs[2 * (i + run) + 1] == pairs[2 * i + 1] + run)
        ++run;
      PAGEDKV_CUDA_CHECK(cudaMemcpyAsync(dp + pairs[2 * i + 1] * bytes, s + pairs[2 * i] * bytes,
                                     size_t(run * bytes), cudaMemcpyDefault, stream));
      i += run;
    }
    finish_cpu_write(dst, stream);
    return;
  }

  TORCH_CHECK(block_mapping.device() == device, op, ": block_mapping must be on the CPU or on ",
              device, ", got ", block_mapping.device());
  if (debug_range_checks())
    check_block_mapping_ranges(op, block_mapping.cpu(), src.size(0), dst.size(0),
                               /*in_place=*/src.is_alias_of(dst));
  if (n == 0 || bytes == 0) return;
  // Device mapping: a copy kernel reads it (no host round trip, capturable); a CPU side
  // is reached through its pinned, mapped host memory.
  const char* s = on_device(src) ? static_cast<const char*>(src.data_ptr())
                                : device_view_of_pinned(op, "src", src);
  char* dp = on_device(dst) ? static_cast<char*>(dst.data_ptr())
                           : device_view_of_pinned(op, "dst", dst);
  const at::Tensor m = block_mapping.contiguous();
  PAGEDKV_CUDA_CHECK(launch_swap_blocks(s, dp, src.size(0), dst.size(0), bytes,
                                    m.data_ptr<int64_t>(), n, stream));
  finish_cpu_write(dst, stream);
}

}  // namespace pagedkv::cuda
