// merge_attn_states: combine two partial attentions of the same rows over disjoint key
// sets by their log-sum-exps (docs/design.md §2). One thread per output element, the
// grid sized from shapes alone (graph-safe); each thread recomputes its row's two
// weights, which costs less than the loads it does anyway.
#include "cuda/common.cuh"

namespace pagedkv::cuda {
namespace {

template <typename AT, typename BT>
__global__ void __launch_bounds__(256)
    merge_kernel(const MergeParams p) {
  using AE = typename Elem<AT>::type;
  using BE = typename Elem<BT>::type;
  const AE* out_a = static_cast<const AE*>(p.out_a);
  const BE* out_b = static_cast<const BE*>(p.out_b);
  AE* out = static_cast<AE*>(p.out);
  const int64_t n = p.rows * p.head_size;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.head_size, d = i - r * p.head_size;
    const float la = __ldg(p.lse_a + r), lb = __ldg(p.lse_b + r);
    const float m = fmaxf(la, lb);
    if (m == kNegInf) {  // neither part saw a key
      out[i] = from_float<AE>(0.f);
      if (d == 0) p.lse[r] = kNegInf;
      continue;
    }
    const float wa = expf(la - m), wb = expf(lb - m), w = wa + wb;
    out[i] = from_float<AE>((wa * to_float(out_a[i]) + wb * to_float(out_b[i])) / w);
    if (d == 0) p.lse[r] = m + logf(w);
  }
}

template <typename AT, typename BT>
cudaError_t launch(const MergeParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t n = p.rows * p.head_size;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = unsigned(blocks < 65535 * 32 ? blocks : 65535 * 32);
  return launch_kernel("merge_kernel", merge_kernel<AT, BT>, dim3(grid), dim3(kThreads), 0, stream,
                       p);
}

template <typename AT>
cudaError_t launch_b(const MergeParams& p, DType b, cudaStream_t stream) {
  switch (b) {
    case DType::kFloat16: return launch<AT, F16>(p, stream);
    case DType::kBFloat16: return launch<AT, BF16>(p, stream);
    case DType::kFloat32: return launch<AT, F32>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_merge_attn_states(const MergeParams& p, DType a, DType b, cudaStream_t stream) {
  if (p.rows <= 0 || p.head_size <= 0) return cudaSuccess;
  switch (a) {
    case DType::kFloat16: return launch_b<F16>(p, b, stream);
    case DType::kBFloat16: return launch_b<BF16>(p, b, stream);
    case DType::kFloat32: return launch_b<F32>(p, b, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace pagedkv::cuda
