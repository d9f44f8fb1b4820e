// reshape_and_cache, copy_blocks and swap_blocks on CUDA.
//
// All three are pure data movement, so they are written for bandwidth: 16-byte vector
// accesses where alignment allows (the glue checks the pointers), consecutive threads on
// consecutive bytes of a row (coalesced), and every index read on the device and
// bounds-checked there (an out-of-range slot or block id is skipped, never followed).
#include "cuda/common.cuh"

namespace pagedkv::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// reshape_and_cache: one thread per 8-element chunk of a token's K row and V row. A
// CTA takes `tokens_per_cta` whole tokens (rows of row_elems elements); its threads walk
// the (token, chunk) pairs, so a warp reads and writes contiguous bytes of a row.
// ---------------------------------------------------------------------------------------

template <typename IT, typename CT, bool VEC>
__device__ __forceinline__ void write_chunk(const typename Elem<IT>::type* src,
                                            typename Elem<CT>::type* dst, float scale) {
  using IE = typename Elem<IT>::type;
  if constexpr (!kIsFp8<CT>) {
    static_assert(std::is_same_v<IT, CT>, "a non-fp8 cache has the input's dtype");
    if constexpr (VEC) {
      // 8 elements = 16 bytes (16-bit types) or 32 bytes (float): copied as is.
      constexpr int kWords = sizeof(IE) * 8 / 16;
#pragma unroll
      for (int w = 0; w < kWords; ++w)
        reinterpret_cast<uint4*>(dst)[w] = __ldg(reinterpret_cast<const uint4*>(src) + w);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src[e];
    }
  } else {
    float f[8];
    if constexpr (VEC) {
      Vec8<IT>::load(src, f);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = to_float(src[e]);
    }
    uint8_t b[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) b[e] = quantize_fp8<CT>(f[e], scale);
    if constexpr (VEC) {
      uint2 w;
      w.x = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
      w.y = uint32_t(b[4]) | uint32_t(b[5]) << 8 | uint32_t(b[6]) << 16 | uint32_t(b[7]) << 24;
      *reinterpret_cast<uint2*>(dst) = w;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = b[e];
    }
  }
}

template <typename IT, typename CT, bool VEC>
__global__ void __launch_bounds__(512)
    reshape_and_cache_kernel(const WriteParams p, int tokens_per_cta) {
  using IE = typename Elem<IT>::type;
  using CE = typename Elem<CT>::type;
  const int chunks = int(p.row_elems >> 3);
  const int64_t tok0 = int64_t(blockIdx.x) * tokens_per_cta;
  const float ks = kIsFp8<CT> ? load_scale(p.k_scale) : 1.f;
  const float vs = kIsFp8<CT> ? load_scale(p.v_scale) : 1.f;
  for (int u = threadIdx.x; u < tokens_per_cta * chunks; u += blockDim.x) {
    const int lt = u / chunks, c = u - lt * chunks;
    const int64_t tok = tok0 + lt;
    if (tok >= p.num_tokens) break;  // u only grows, so later u are past the end too
    const int64_t slot = __ldg(p.slot_mapping + tok);
    if (slot < 0 || slot >= p.num_slots) continue;  // padding (negative) or out of range
    const int64_t off = slot * p.row_elems + c * 8;
    write_chunk<IT, CT, VEC>(static_cast<const IE*>(p.key) + tok * p.key_stride_tok + c * 8,
                             static_cast<CE*>(p.key_cache) + off, ks);
    write_chunk<IT, CT, VEC>(static_cast<const IE*>(p.value) + tok * p.value_stride_tok + c * 8,
                             static_cast<CE*>(p.value_cache) + off, vs);
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

using WriteKernel = void (*)(const WriteParams, int);

template <typename IT, typename CT>
WriteKernel write_kernel(bool vec) {
  return vec ? reshape_and_cache_kernel<IT, CT, true> : reshape_and_cache_kernel<IT, CT, false>;
}

// The kernel for (input, cache) dtypes, or nullptr for an unsupported pair.
WriteKernel pick_write_kernel(DType in, DType cache, bool vec) {
  switch (cache) {
    case DType::kFloat32: return in == cache ? write_kernel<F32, F32>(vec) : nullptr;
    case DType::kFloat16: return in == cache ? write_kernel<F16, F16>(vec) : nullptr;
    case DType::kBFloat16: return in == cache ? write_kernel<BF16, BF16>(vec) : nullptr;
    case DType::kFp8E4M3:
    case DType::kFp8E5M2: {
      const bool e4 = cache == DType::kFp8E4M3;
      switch (in) {
        case DType::kFloat32: return e4 ? write_kernel<F32, E4M3>(vec) : write_kernel<F32, E5M2>(vec);
        case DType::kFloat16: return e4 ? write_kernel<F16, E4M3>(vec) : write_kernel<F16, E5M2>(vec);
        case DType::kBFloat16: return e4 ? write_kernel<BF16, E4M3>(vec) : write_kernel<BF16, E5M2>(vec);
        default: return nullptr;
      }
    }
  }
  return nullptr;
}

int elem_bytes(DType d) {
  switch (d) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 1;
  }
}

// ---------------------------------------------------------------------------------------
// Block copies: one CTA per (pair, layer, K or V) copies one block, 16 bytes per thread
// per step when the block's bytes and bases allow it.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void copy_block(const char* src, char* dst, int64_t bytes) {
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | uintptr_t(bytes)) & 15) == 0) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < (bytes >> 4); i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
  }
}

// The layer table is a by-value kernel parameter (constant bank), so no pointer array is
// ever built in device memory and a captured graph keeps it with the kernel node.
__global__ void __launch_bounds__(256)
    copy_blocks_kernel(const CopyLayers layers, const int64_t* mapping) {
  const int64_t pair = blockIdx.x;
  const CopyLayer& l = layers.layer[blockIdx.y];
  const int64_t src = mapping[2 * pair], dst = mapping[2 * pair + 1];
  if (src < 0 || src >= l.num_blocks || dst < 0 || dst >= l.num_blocks) return;
  char* base = blockIdx.z == 0 ? l.key : l.value;
  copy_block(base + src * l.block_bytes, base + dst * l.block_bytes, l.block_bytes);
}

// src/dst may be pinned host memory: with unified virtual addressing a kernel reads and
// writes it directly (over PCIe), so a device-resident mapping needs no host round trip.
__global__ void __launch_bounds__(256)
    swap_blocks_kernel(const char* src, char* dst, int64_t src_blocks, int64_t dst_blocks,
                       int64_t block_bytes, const int64_t* mapping) {
  const int64_t pair = blockIdx.x;
  const int64_t s = mapping[2 * pair], d = mapping[2 * pair + 1];
  if (s < 0 || s >= src_blocks || d < 0 || d >= dst_blocks) return;
  copy_block(src + s * block_bytes, dst + d * block_bytes, block_bytes);
}

constexpr int kCopyThreads = 256;

}  // namespace

cudaError_t launch_reshape_and_cache(const WriteParams& p, DType input, DType cache,
                                     int threads, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.row_elems == 0) return cudaSuccess;
  const int ib = elem_bytes(input), cb = elem_bytes(cache);
  const int64_t in_align = ib * 8 >= 16 ? 16 : ib * 8;   // a chunk's natural alignment
  const int64_t out_align = cb * 8 >= 16 ? 16 : cb * 8;
  const bool vec = aligned(p.key, in_align) && aligned(p.value, in_align) &&
                   (p.key_stride_tok * ib) % in_align == 0 &&
                   (p.value_stride_tok * ib) % in_align == 0 &&
                   aligned(p.key_cache, out_align) && aligned(p.value_cache, out_align);
  const WriteKernel fn = pick_write_kernel(input, cache, vec);
  if (fn == nullptr) return cudaErrorInvalidValue;
  const int64_t chunks = p.row_elems / 8;
  const int tokens_per_cta = int(threads / chunks > 0 ? threads / chunks : 1);
  const int64_t blocks = (p.num_tokens + tokens_per_cta - 1) / tokens_per_cta;
  return launch_kernel("reshape_and_cache_kernel", fn, dim3(unsigned(blocks)), dim3(threads), 0,
                       stream, p, tokens_per_cta);
}

cudaError_t launch_copy_blocks(const CopyLayers& layers, const int64_t* block_mapping,
                               int64_t num_pairs, cudaStream_t stream) {
  if (num_pairs == 0 || layers.num_layers == 0) return cudaSuccess;
  return launch_kernel("copy_blocks_kernel", copy_blocks_kernel,
                       dim3(unsigned(num_pairs), unsigned(layers.num_layers), 2),
                       dim3(kCopyThreads), 0, stream, layers, block_mapping);
}

cudaError_t launch_swap_blocks(const char* src, char* dst, int64_t src_blocks,
                               int64_t dst_blocks, int64_t block_bytes,
                               const int64_t* block_mapping, int64_t num_pairs,
                               cudaStream_t stream) {
  if (num_pairs == 0) return cudaSuccess;
  return launch_kernel("swap_blocks_kernel", swap_blocks_kernel, dim3(unsigned(num_pairs)),
                       dim3(kCopyThreads), 0, stream, src, dst, src_blocks, dst_blocks,
                       block_bytes, block_mapping);
}

cudaError_t cache_kernel_info(int which, DType input, DType cache, int threads, KernelInfo* info) {
  const void* fn = which == 0   ? reinterpret_cast<const void*>(pick_write_kernel(input, cache, true))
                   : which == 1 ? reinterpret_cast<const void*>(copy_blocks_kernel)
                                : reinterpret_cast<const void*>(swap_blocks_kernel);
  if (fn == nullptr) return cudaErrorInvalidValue;
  cudaFuncAttributes a{};
  cudaError_t e = cudaFuncGetAttributes(&a, fn);
  if (e != cudaSuccess) return e;
  int blocks = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, threads, 0);
  if (e != cudaSuccess) return e;
  *info = KernelInfo{blocks, a.numRegs, int(a.localSizeBytes), int(a.sharedSizeBytes), 0,
                     a.maxThreadsPerBlock};
  return cudaSuccess;
}

}  // namespace pagedkv::cuda
