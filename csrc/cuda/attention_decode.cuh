// paged_attention, decode path: split-K flash-decoding over the paged cache.
//
// Grid: (query row, kv head x head chunk, split). A partition is a FIXED number of key
// positions (LaunchConfig::partition_size); split s of a row walks the row's partitions
// first + s, first + s + splits, ... (first: the partition of its first visible key),
// folding each into its running softmax. The number of splits comes from shapes and the
// device only (decode_plan in launch_config.cpp: enough CTAs to fill the GPU, a bounded
// float32 scratch), so a CUDA graph captured for one set of metadata replays correctly
// for any other, and the scratch no longer grows with the block table's width. Splits
// with no partition of the row exit at once. In a mixed batch (more query rows than
// sequences) grid x runs over sequences instead and only sequences with exactly one
// query row are served here, split-K; the prefill kernel takes the others.
//
// One CTA serves every query head of its GQA group (up to kMaxHeadsPerCta): each K and V
// row is loaded from memory once and used for all of them. A "token group" of TG lanes
// reads one cache row (one token of one kv head) with 8-element vector loads (16 bytes
// for 16-bit caches), fp8 is widened in registers. Per partition:
//   1. scores: each group computes q.k for its tokens (dot over its lanes, then a
//      shuffle reduction inside the group) and writes them to shared memory;
//   2. softmax: the partition's max joins the running max of each head (one warp per
//      head), the partition's scores become exp(score - running max), and the factor
//      exp(old max - new max) rescales the running sum (and, in 4, the running output);
//   3. values: each group accumulates p * v over the same tokens in registers;
//   4. fold: groups are summed with shuffles and warps into a running output in shared
//      memory, rescaled by the partition's factor.
// A row served by a single split writes its output directly; otherwise every
// split writes (output / sum, max, sum) to scratch and decode_reduce_kernel merges them
// by log-sum-exp. Both kernels derive the row's splits from the same device-side
// metadata, so they agree without any host involvement. paged_attention_lse also gets
// each row's lse from whichever kernel writes the row's output.
#pragma once

#include "cuda/common.cuh"
#include "dispatch.h"

namespace pagedkv::cuda {

// How lanes cover a cache row of HEAD elements (HEAD = 0: generic, any head size up to
// 512 read at run time): TG lanes per row, CPL chunks of 8 elements per lane, U rows in
// flight per group (more loads in flight hide memory latency). MAXH (1, 2, 4 or 8) is
// the number of query heads a CTA can serve: the query vectors and accumulators take
// 2 * MAXH * CPL * 8 registers per lane, so a small GQA group gets a small kernel.
template <int HEAD, int MAXH>
struct RowLayout {
  static constexpr int kChunks = HEAD / 8;
  static constexpr int TG = HEAD == 0 ? 32 : (kChunks <= 8 ? 8 : (kChunks <= 16 ? 16 : 32));
  static constexpr int CPL = HEAD == 0 ? 2 : (kChunks + TG - 1) / TG;
  // Rows in flight per group: fewer when the per-head registers (query, accumulator)
  // are many, to stay clear of spills.
  static constexpr int U = CPL * MAXH >= 8 ? 2 : 4;
  static_assert(HEAD % 8 == 0 && HEAD <= 256, "specialized head sizes are multiples of 8 <= 256");
};

// A token group's share of U cache rows: rows i0, i0 + NG, ... of the partition starting
// at key lo (n keys), chunks gl, gl + TG, ... of each, widened to float. ok[u] is false,
// and the row zeros, past the partition's end or where the block table has no readable
// block.
template <typename CT, int TG, typename CE, int U, int CPL>
__device__ __forceinline__ void load_rows(const CE* cache, const BlockLookup& look,
                                          int64_t row_stride, int i0, int NG, int n, int lo,
                                          int gl, int nchunks, float (&f)[U][CPL][8],
                                          bool (&ok)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int i = i0 + u * NG;
    const int64_t slot = i < n ? look.slot(lo + i) : -1;  // -1: past the end or bad block
    ok[u] = slot >= 0;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const int c = gl + j * TG;
      if (ok[u] && c < nchunks) {
        Vec8<CT>::load(cache + slot * row_stride + c * 8, f[u][j]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[u][j][e] = 0.f;
      }
    }
  }
}

template <typename QT, typename CT, int HEAD, int MAXH>
__global__ void __launch_bounds__(256)
    decode_kernel(const AttentionParams p, const DecodeScratch scratch, int hp, int P,
                  int block_shift) {
  using QE = typename Elem<QT>::type;
  using CE = typename Elem<CT>::type;
  using L = RowLayout<HEAD, MAXH>;
  constexpr int TG = L::TG, CPL = L::CPL, U = L::U;

  const int D = HEAD > 0 ? HEAD : p.head_size;
  const int nchunks = D >> 3;
  const int x = blockIdx.x;  // query row, or (mixed batch) sequence; indexes the scratch
  const int split = blockIdx.z;
  const int splits = gridDim.z;
  const int t = decode_row_of(p, x);
  if (t < 0) return;  // mixed batch: a sequence the prefill kernel serves
  const int G = p.num_heads / p.num_kv_heads;
  const int head_chunks = (G + hp - 1) / hp;
  const int kvh = blockIdx.y / head_chunks;
  const int h0 = kvh * G + (blockIdx.y % head_chunks) * hp;  // first query head of this CTA
  const int gp = min(hp, kvh * G + G - h0);                  // query heads of this CTA
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, NW = blockDim.x >> 5;
  const int gl = tid % TG, grp = tid / TG, NG = blockDim.x / TG;
  QE* out = static_cast<QE*>(p.out);

  const RowInfo row = locate_row(p, t);
  if (!row.valid) {  // no visible key (or malformed metadata): output 0, lse -inf
    if (split == 0) {
      const float zero[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int idx = tid; idx < gp * nchunks; idx += blockDim.x) {
        const int h = idx / nchunks, c = idx - h * nchunks;
        Vec8<QT>::store(out + (int64_t(t) * p.num_heads + h0 + h) * D + c * 8, zero);
      }
      if (p.lse && tid < gp) p.lse[int64_t(t) * p.num_heads + h0 + tid] = kNegInf;
    }
    return;
  }
  const int first = row.k_lo / P, last = (row.k_hi - 1) / P;
  const int active = min(last - first + 1, splits);  // splits with at least one partition
  if (split >= active) return;  // uniform over the CTA: no barrier is skipped
  const bool single = active == 1;

  PAGEDKV_DYNAMIC_SMEM(float, smem);
  float* logits = smem;                // [hp][P] scores, then probabilities
  float* o_s = logits + hp * P;        // [hp][D] running sum of p * v (rescaled as m grows)
  float* q_s = o_s + hp * D;           // [hp][D] query * scale (* k_scale for fp8)
  float* m_s = q_s + hp * D;           // [kMaxHeadsPerCta] running max score per head
  float* l_s = m_s + kMaxHeadsPerCta;  // [kMaxHeadsPerCta] running sum of exp per head
  float* a_s = l_s + kMaxHeadsPerCta;  // [kMaxHeadsPerCta] this partition's rescale factor
  if (tid < kMaxHeadsPerCta) {
    m_s[tid] = kNegInf;
    l_s[tid] = 0.f;
  }
  // The query vectors are staged in shared memory and loaded into registers for each
  // partition's score pass only, and the value accumulators live for each partition's
  // value pass only (then fold into o_s): the two never hold registers at once, as in a
  // kernel walking one partition.
  const float qmul = p.scale * load_scale(p.k_scale);
  const QE* query = static_cast<const QE*>(p.query);
  for (int idx = tid; idx < gp * D; idx += blockDim.x) {
    const int h = idx / D, d = idx - h * D;
    q_s[idx] = to_float(query[t * p.q_stride_tok + (h0 + h) * p.q_stride_head +
                              d * p.q_stride_dim]) * qmul;
    o_s[idx] = 0.f;
  }
  float slope[MAXH];
#pragma unroll
  for (int h = 0; h < MAXH; ++h)
    slope[h] = (h < gp && p.alibi_slopes) ? __ldg(p.alibi_slopes + h0 + h) : 0.f;

  const int64_t row_stride = int64_t(p.num_kv_heads) * D;  // elements per cache slot
  const CE* kc = static_cast<const CE*>(p.key_cache) + int64_t(kvh) * D;
  const CE* vc = static_cast<const CE*>(p.value_cache) + int64_t(kvh) * D;
  const BlockLookup look{p.block_table + int64_t(row.seq) * p.block_table_stride, p.block_size,
                         block_shift, p.num_blocks};
  __syncthreads();  // q_s, o_s, m_s, l_s are set

  for (int part = first + split; part <= last; part += splits) {
    const int lo = max(row.k_lo, part * P), hi = min(row.k_hi, (part + 1) * P);
    const int n = hi - lo;  // keys of this partition, all visible (a row's keys are contiguous)
    // Group grp handles keys lo + grp, lo + grp + NG, ...; the trip count is the same for
    // every lane of the CTA, so the shuffles below always see the whole warp.
    const int iters = (n + NG - 1) / NG;

    // 1. Scores.
    float q[MAXH][CPL][8];
#pragma unroll
    for (int h = 0; h < MAXH; ++h)
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const int c = gl + j * TG;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          q[h][j][e] = h < gp && c < nchunks ? q_s[h * D + c * 8 + e] : 0.f;
      }
    for (int it = 0; it < iters; it += U) {
      float kf[U][CPL][8];
      bool ok[U];
      load_rows<CT, TG>(kc, look, row_stride, it * NG + grp, NG, n, lo, gl, nchunks, kf, ok);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = (it + u) * NG + grp;
#pragma unroll
        for (int h = 0; h < MAXH; ++h) {
          if (h < gp) {  // uniform over the CTA
            float dot = 0.f;
#pragma unroll
            for (int j = 0; j < CPL; ++j)
#pragma unroll
              for (int e = 0; e < 8; ++e) dot = fmaf(q[h][j][e], kf[u][j][e], dot);
#pragma unroll
            for (int off = TG / 2; off > 0; off >>= 1)
              dot += __shfl_xor_sync(0xffffffffu, dot, off);
            if (i < n && gl == h) {  // TG >= 8 >= MAXH: lane h of the group writes head h
              logits[h * P + i] = ok[u] ? finish_score(dot, p.softcap, slope[h], lo + i, row.pos)
                                        : kNegInf;
            }
          }
        }
      }
    }
    __syncthreads();

    // 2. Softmax: the partition joins each head's running max and sum.
    for (int h = warp; h < gp; h += NW) {
      float* lg = logits + h * P;
      float mx = kNegInf;
      for (int i = lane; i < n; i += 32) mx = fmaxf(mx, lg[i]);
      mx = warp_max(mx);
      const float m_old = m_s[h];
      const float m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int i = lane; i < n; i += 32) {
        const float e = m_new == kNegInf ? 0.f : expf(lg[i] - m_new);
        lg[i] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read m_s[h] before lane 0 overwrites it
      if (lane == 0) {
        const float alpha = m_new == kNegInf ? 1.f : expf(m_old - m_new);  // 0 when m_old = -inf
        m_s[h] = m_new;
        l_s[h] = l_s[h] * alpha + sum;
        a_s[h] = alpha;
      }
    }
    __syncthreads();

    // 3. Values: the same token assignment, so each V row is read once.
    float acc[MAXH][CPL][8];
#pragma unroll
    for (int h = 0; h < MAXH; ++h)
#pragma unroll
      for (int j = 0; j < CPL; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][j][e] = 0.f;
    for (int it = 0; it < iters; it += U) {
      float vf[U][CPL][8];
      bool ok[U];
      load_rows<CT, TG>(vc, look, row_stride, it * NG + grp, NG, n, lo, gl, nchunks, vf, ok);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        const int i = (it + u) * NG + grp;
#pragma unroll
        for (int h = 0; h < MAXH; ++h) {
          if (h < gp) {
            const float w = logits[h * P + i];
#pragma unroll
            for (int j = 0; j < CPL; ++j)
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[h][j][e] = fmaf(w, vf[u][j][e], acc[h][j][e]);
          }
        }
      }
    }

    // 4. Fold into o_s: the groups of each warp by shuffles (lanes with equal gl hold the
    //    same output elements), then the warps in a fixed order (deterministic), the
    //    first one rescaling o_s by this partition's factor.
#pragma unroll
    for (int off = TG; off < 32; off <<= 1)
#pragma unroll
      for (int h = 0; h < MAXH; ++h)
        if (h < gp)
#pragma unroll
          for (int j = 0; j < CPL; ++j)
#pragma unroll
            for (int e = 0; e < 8; ++e)
              acc[h][j][e] += __shfl_xor_sync(0xffffffffu, acc[h][j][e], off);
    for (int w = 0; w < NW; ++w) {
      if (warp == w && lane < TG) {
#pragma unroll
        for (int h = 0; h < MAXH; ++h) {
          if (h < gp) {
            const float alpha = a_s[h];
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
              const int c = lane + j * TG;
              if (c < nchunks) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                  float* r = o_s + h * D + c * 8 + e;
                  *r = (w == 0 ? *r * alpha : *r) + acc[h][j][e];
                }
              }
            }
          }
        }
      }
      __syncthreads();  // also: every warp is done with logits and a_s of this partition
    }
  }

  const float vs = load_scale(p.v_scale);
  for (int idx = tid; idx < gp * nchunks; idx += blockDim.x) {
    const int h = idx / nchunks, c = idx - h * nchunks;
    const float l = l_s[h];
    const float inv = l > 0.f ? vs / l : 0.f;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = o_s[h * D + c * 8 + e] * inv;
    if (single) {
      Vec8<QT>::store(out + (int64_t(t) * p.num_heads + h0 + h) * D + c * 8, o);
    } else {
      const int64_t slot = (int64_t(x) * p.num_heads + h0 + h) * splits + split;
      Vec8<F32>::store(scratch.part_out + slot * D + c * 8, o);
    }
  }
  if (!single && tid < gp) {
    const int64_t idx = (int64_t(x) * p.num_heads + h0 + tid) * splits + split;
    scratch.part_max[idx] = m_s[tid];
    scratch.part_sum[idx] = l_s[tid];
  }
  if (single && p.lse && tid < gp) {
    p.lse[int64_t(t) * p.num_heads + h0 + tid] = lse_of(m_s[tid], l_s[tid]);
  }
}

// Merges the splits of each (row, head) by log-sum-exp: with split maxima m_i, sums l_i
// and normalized outputs o_i, out = sum_i w_i o_i / sum_i w_i where
// w_i = l_i exp(m_i - max_i m_i). Rows served by a single split were written by the
// decode kernel and are skipped here. Grid: (decode_plan rows, heads).
template <typename QT>
__global__ void __launch_bounds__(128)
    decode_reduce_kernel(const AttentionParams p, const DecodeScratch scratch, int P,
                         int splits) {
  using QE = typename Elem<QT>::type;
  const int x = blockIdx.x, h = blockIdx.y;
  const int t = decode_row_of(p, x);
  if (t < 0) return;
  const RowInfo row = locate_row(p, t);
  if (!row.valid) return;
  const int first = row.k_lo / P, last = (row.k_hi - 1) / P;
  const int active = min(last - first + 1, splits);
  if (active <= 1) return;
  const int64_t base = (int64_t(x) * p.num_heads + h) * splits;
  const float* pm = scratch.part_max + base;
  const float* ps = scratch.part_sum + base;

  float M = kNegInf;
  for (int q = 0; q < active; ++q)
    if (ps[q] > 0.f) M = fmaxf(M, pm[q]);
  float total = 0.f;
  for (int q = 0; q < active; ++q)
    if (ps[q] > 0.f) total += ps[q] * expf(pm[q] - M);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  if (p.lse && threadIdx.x == 0) p.lse[int64_t(t) * p.num_heads + h] = lse_of(M, total);

  const int D = p.head_size;
  QE* out = static_cast<QE*>(p.out) + (int64_t(t) * p.num_heads + h) * D;
  for (int c = threadIdx.x; c < (D >> 3); c += blockDim.x) {
    float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int q = 0; q < active; ++q) {
      if (!(ps[q] > 0.f)) continue;
      const float w = ps[q] * expf(pm[q] - M) * inv;
      float x[8];
      Vec8<F32>::load(scratch.part_out + (base + q) * D + c * 8, x);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = fmaf(w, x[e], o[e]);
    }
    Vec8<QT>::store(out + c * 8, o);
  }
}

// Runs f(Int<HEAD>) with the compile-time head size (0 = generic kernel).
template <typename F>
inline void with_head_size(int head_size, bool generic, F&& f) {
  if (generic) f(Int<0>{});
  else dispatch_head_size(head_size, f);
}

// The kernel serving `hp` query heads per CTA: the smallest MAXH >= hp.
template <typename Q, typename C, int HEAD>
auto decode_kernel_for(int hp) {
  return hp <= 1 ? decode_kernel<Q, C, HEAD, 1>
                 : hp <= 2 ? decode_kernel<Q, C, HEAD, 2>
                           : hp <= 4 ? decode_kernel<Q, C, HEAD, 4> : decode_kernel<Q, C, HEAD, 8>;
}

template <typename Q, typename C, int HEAD>
cudaError_t decode_launch_impl(const AttentionParams& p, const DecodeScratch& s,
                               const DecodePlan& plan, const LaunchConfig& cfg,
                               cudaStream_t stream) {
  const int G = p.num_heads / p.num_kv_heads;
  const int hp = heads_per_cta(G);
  const int head_chunks = (G + hp - 1) / hp;
  const int P = cfg.partition_size;
  const size_t smem = decode_smem_bytes(p.head_size, hp, P);
  auto* kernel = decode_kernel_for<Q, C, HEAD>(hp);
  cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  if (plan.rows == 0) return cudaSuccess;
  const dim3 grid(unsigned(plan.rows), unsigned(p.num_kv_heads * head_chunks),
                  unsigned(plan.splits));
  e = launch_kernel("decode_kernel", kernel, grid, dim3(cfg.decode_threads), smem, stream, p, s,
                    hp, P, log2_if_pow2(p.block_size));
  if (e != cudaSuccess || plan.splits <= 1) return e;
  const int threads = (p.head_size / 8 + 31) / 32 * 32;
  const dim3 reduce_grid(unsigned(plan.rows), unsigned(p.num_heads));
  return launch_kernel("decode_reduce_kernel", decode_reduce_kernel<Q>, reduce_grid,
                       dim3(threads), 0, stream, p, s, P, int(plan.splits));
}

template <typename Q, typename C>
cudaError_t launch_decode(const AttentionParams& p, const DecodeScratch& s,
                          const DecodePlan& plan, const LaunchConfig& cfg, bool generic,
                          cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_head_size(p.head_size, generic, [&](auto head) {
    err = decode_launch_impl<Q, C, decltype(head)::value>(p, s, plan, cfg, stream);
  });
  return err;
}

inline cudaError_t fill_kernel_info(const void* fn, int threads, size_t smem, KernelInfo* info) {
  cudaFuncAttributes a{};
  cudaError_t e = cudaFuncGetAttributes(&a, fn);
  if (e != cudaSuccess) return e;
  e = allow_dynamic_smem(fn, smem);
  if (e != cudaSuccess) return e;
  int blocks = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, threads, smem);
  if (e != cudaSuccess) return e;
  *info = KernelInfo{blocks, a.numRegs, int(a.localSizeBytes), int(a.sharedSizeBytes), int(smem),
                     a.maxThreadsPerBlock};
  return cudaSuccess;
}

template <typename Q, typename C>
cudaError_t decode_kernel_info(AttentionKernel which, int head_size, int heads, bool generic,
                               int threads, size_t smem, KernelInfo* info) {
  cudaError_t err = cudaSuccess;
  with_head_size(head_size, generic, [&](auto head) {
    const void* fn =
        which == AttentionKernel::kDecodeReduce
            ? reinterpret_cast<const void*>(decode_reduce_kernel<Q>)
            : reinterpret_cast<const void*>(decode_kernel_for<Q, C, decltype(head)::value>(heads));
    err = fill_kernel_info(fn, threads, smem, info);
  });
  return err;
}

}  // namespace pagedkv::cuda

// Explicit instantiation for one (query, cache) dtype pair, in its own .cu file so that
// ninja compiles the pairs in parallel.
#define PAGEDKV_INSTANTIATE_DECODE(Q, C)                                                      \
  template cudaError_t launch_decode<Q, C>(const AttentionParams&, const DecodeScratch&,      \
                                           const DecodePlan&, const LaunchConfig&, bool,      \
                                           cudaStream_t);                                     \
  template cudaError_t decode_kernel_info<Q, C>(AttentionKernel, int, int, bool, int, size_t, \
                                                KernelInfo*);
