// Kernels that break the rules on purpose, so the tests can check that the emulator
// catches each kind of error (tests/test_simt.py), and small correct kernels whose results
// pin down its barrier and shuffle semantics. torch.ops.pagedkv_simt._simt_selftest.
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "cuda/launch.cuh"

namespace pagedkv::simt {
namespace {

__global__ void divergent_barrier(float*) {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void two_barriers(float*) {
  if (threadIdx.x % 2) __syncthreads();
  else __syncthreads();
}

__global__ void shuffles_at_two_calls(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_after_a_lane_exits(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void shared_write_past_the_end(float* out) {
  PAGEDKV_DYNAMIC_SMEM(float, smem);  // launched with 64 floats
  smem[threadIdx.x] = 1.f;
  __syncthreads();
  if (threadIdx.x == 0) smem[64 + 1024] = 2.f;  // a page past the end
  out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void shared_write_into_the_slack(float* out) {
  PAGEDKV_DYNAMIC_SMEM(float, smem);  // launched with 5 floats: 12 bytes of slack
  if (threadIdx.x == 0) smem[5] = 1.f;
  out[threadIdx.x] = 0.f;
}

// Thread i writes smem[i] and reads its neighbour's slot: with the barrier every order gives
// out[i] = i + 1 (mod n); without it, the neighbour may not have written yet (0xff.. = NaN).
template <bool kBarrier>
__global__ void neighbour(float* out) {
  PAGEDKV_DYNAMIC_SMEM(float, smem);
  const int n = blockDim.x, i = threadIdx.x;
  smem[i] = float(i);
  if (kBarrier) __syncthreads();
  out[i] = smem[(i + 1) % n];
}

// Every shuffle flavour over a warp: out[4 * lane + {0,1,2,3}] = xor 1 (width 32), down 1
// (width 8), up 2 (width 8), idx 5 (width 16) of the value 100 + lane; then a warp sum.
__global__ void shuffles(float* out) {
  const int lane = threadIdx.x & 31;
  const float v = 100.f + lane;
  out[5 * threadIdx.x + 0] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[5 * threadIdx.x + 1] = __shfl_down_sync(0xffffffffu, v, 1, 8);
  out[5 * threadIdx.x + 2] = __shfl_up_sync(0xffffffffu, v, 2, 8);
  out[5 * threadIdx.x + 3] = __shfl_sync(0xffffffffu, v, 5, 16);
  float s = v;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  __syncwarp();
  out[5 * threadIdx.x + 4] = s;
}

__global__ void misaligned_load(float* out) {
  const float4* p = reinterpret_cast<const float4*>(out + 1);
  const float4 x = __ldg(p);
  out[threadIdx.x] = x.x;
}

__global__ void nothing(float*) {}

at::Tensor selftest(const std::string& which, int64_t threads) {
  at::Tensor out = at::zeros({5 * threads + 8}, at::kFloat);
  float* o = out.data_ptr<float>();
  const dim3 g{1}, b{unsigned(threads)};
  cudaError_t e = cudaSuccess;
  using pagedkv::cuda::launch_kernel;
  if (which == "divergent_barrier") e = launch_kernel("divergent_barrier", divergent_barrier, g, b, 0, nullptr, o);
  else if (which == "two_barriers") e = launch_kernel("two_barriers", two_barriers, g, b, 0, nullptr, o);
  else if (which == "shuffles_at_two_calls") e = launch_kernel("shuffles_at_two_calls", shuffles_at_two_calls, g, b, 0, nullptr, o);
  else if (which == "shuffle_after_a_lane_exits") e = launch_kernel("shuffle_after_a_lane_exits", shuffle_after_a_lane_exits, g, b, 0, nullptr, o);
  else if (which == "shared_write_past_the_end") e = launch_kernel("shared_write_past_the_end", shared_write_past_the_end, g, b, 64 * sizeof(float), nullptr, o);
  else if (which == "shared_write_into_the_slack") e = launch_kernel("shared_write_into_the_slack", shared_write_into_the_slack, g, b, 5 * sizeof(float), nullptr, o);
  else if (which == "neighbour") e = launch_kernel("neighbour<true>", neighbour<true>, g, b, threads * sizeof(float), nullptr, o);
  else if (which == "neighbour_without_barrier") e = launch_kernel("neighbour<false>", neighbour<false>, g, b, threads * sizeof(float), nullptr, o);
  else if (which == "shuffles") e = launch_kernel("shuffles", shuffles, g, b, 0, nullptr, o);
  else if (which == "misaligned_load") e = launch_kernel("misaligned_load", misaligned_load, g, b, 0, nullptr, o);
  else if (which == "too_much_shared_memory") e = launch_kernel("nothing", nothing, g, b, 64 * 1024, nullptr, o);
  else if (which == "raised_shared_memory") {
    e = cudaFuncSetAttribute(reinterpret_cast<const void*>(nothing), cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
    if (e == cudaSuccess) e = launch_kernel("nothing", nothing, g, b, 64 * 1024, nullptr, o);
    cudaFuncSetAttribute(reinterpret_cast<const void*>(nothing), cudaFuncAttributeMaxDynamicSharedMemorySize, 48 * 1024);
  } else if (which == "grid_too_large") {
    e = launch_kernel("nothing", nothing, dim3(1, 70000), b, 0, nullptr, o);
  } else TORCH_CHECK(false, "_simt_selftest: unknown case '", which, "'");
  TORCH_CHECK(e == cudaSuccess, "CUDA error: ", cudaGetErrorString(e), " (SIMT emulator: ", last_failure(), ")");
  return out;
}

}  // namespace
}  // namespace pagedkv::simt

TORCH_LIBRARY_FRAGMENT(pagedkv_simt, m) {
  m.def("_simt_selftest(str case, int threads) -> Tensor");
}
TORCH_LIBRARY_IMPL(pagedkv_simt, CompositeExplicitAutograd, m) {
  m.impl("_simt_selftest", &pagedkv::simt::selftest);
}
