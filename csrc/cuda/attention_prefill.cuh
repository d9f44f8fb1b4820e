// paged_attention, prefill/mixed path: tiles of query rows of one sequence.
//
// Grid: (num_q_tokens / rows_per_tile + num_seqs, kv heads x head chunks). Sequence i
// owns tiles [C_i, C_{i+1}) with C_i = query_start_loc[i] / rows_per_tile + i, which is
// strictly increasing and gives every sequence at least ceil(q_len / rows_per_tile)
// tiles; a CTA finds its sequence by binary search over query_start_loc on the device.
// So the grid depends on num_q_tokens and num_seqs only: no host ever reads the query
// lengths, and surplus tiles exit at once.
//
// A CTA holds `qv` query vectors (its rows x the query heads of its GQA chunk) in
// shared memory and walks the keys its rows can see, `kt` at a time: K and V rows are
// gathered through the block table (dequantized to float32 once, shared by all the
// vectors), scores get softcap, ALiBi and the causal / sliding-window mask, and an
// online softmax folds each key tile into the output accumulator (also in shared
// memory). A simple CUDA-core kernel: correct for any mix of query lengths, with
// K/V traffic shared across the rows and heads of a tile. paged_attention_lse: each row
// also writes its lse (m + log l); with causal=False every row sees the whole sequence,
// so a shared prefix's K/V tile serves all the tile's rows.
#pragma once

#include "cuda/common.cuh"
#include "cuda/attention_decode.cuh"  // with_head_size, fill_kernel_info

namespace pagedkv::cuda {

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

template <typename QT, typename CT, int HEAD>
__global__ void __launch_bounds__(256)
    prefill_kernel(const AttentionParams p, int hp, int tr, int block_shift) {
  using QE = typename Elem<QT>::type;
  using CE = typename Elem<CT>::type;
  constexpr PrefillTile kTile = prefill_tile(HEAD);
  const int D = HEAD > 0 ? HEAD : p.head_size;
  const PrefillTile tile = HEAD > 0 ? kTile : prefill_tile(p.head_size);
  const int QV = tile.qv, KT = tile.kt, LPU = tile.lanes;
  const int DP = D + 4;  // padded row: spreads rows over the shared-memory banks
  const int D4 = D >> 2, nchunks = D >> 3;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, NT = blockDim.x,
            NW = blockDim.x >> 5;

  // Tile -> sequence, rows [r0, r0 + nr) of it.
  if (p.num_seqs <= 0) return;
  const int32_t* qsl = p.query_start_loc;
  const int64_t t = blockIdx.x;
  int seq = 0;
  {
    int lo = 0, hi = p.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (int64_t(__ldg(qsl + mid)) / tr + mid <= t) lo = mid;
      else hi = mid - 1;
    }
    seq = lo;
  }
  const int64_t q0 = __ldg(qsl + seq), q1 = __ldg(qsl + seq + 1);
  if (q0 < 0 || q1 < q0 || q1 > p.num_q_tokens) return;  // malformed: never write out of bounds
  const int64_t local = t - (q0 / tr + seq);
  const int64_t q_len = q1 - q0;
  if (local < 0 || local * tr >= q_len) return;  // a surplus tile
  if (p.single_rows_to_decode && q_len == 1) return;  // the split-K decode kernel serves it
  const int64_t r0 = local * tr;
  const int nr = int(min(int64_t(tr), q_len - r0));

  const int G = p.num_heads / p.num_kv_heads;
  const int head_chunks = (G + hp - 1) / hp;
  const int kvh = blockIdx.y / head_chunks;
  const int h0 = kvh * G + (blockIdx.y % head_chunks) * hp;
  const int gp = min(hp, kvh * G + G - h0);
  const int nv = nr * hp;  // vector v = (row v / hp, head v % hp); valid iff head < gp

  const int64_t max_ctx = int64_t(p.max_blocks_per_seq) * p.block_size;
  const int64_t seq_len = __ldg(p.seq_lens + seq);
  const int64_t p_first = seq_len - q_len + r0;  // row r0's position
  const int64_t p_last = p_first + nr - 1;
  const bool causal = p.causal;
  const int W = causal ? p.sliding_window : -1;
  const int64_t k_lo = W > 0 ? max(int64_t(0), p_first - W + 1) : 0;
  // Keys up to the tile's last row, or (causal=False) the whole sequence.
  const int64_t k_hi = min(causal ? p_last + 1 : seq_len, max_ctx);

  PAGEDKV_DYNAMIC_SMEM(float, smem);
  float* Qs = smem;             // [QV][DP] query * scale * k_scale
  float* Ks = Qs + QV * DP;     // [KT][DP] key tile (float32)
  float* Vs = Ks + KT * DP;     // [KT][DP] value tile
  float* Ss = Vs + KT * DP;     // [QV][KT] scores, then probabilities
  float* Os = Ss + QV * KT;     // [QV][D] output accumulator
  float* m_s = Os + QV * D;     // [QV] running max
  float* l_s = m_s + QV;        // [QV] running sum
  float* a_s = l_s + QV;        // [QV] rescale factor of the current tile
  int* kval = reinterpret_cast<int*>(a_s + QV);  // [KT] key readable (block id in range)

  const float qmul = p.scale * load_scale(p.k_scale);
  const QE* query = static_cast<const QE*>(p.query);
  for (int idx = tid; idx < QV * D; idx += NT) {
    const int v = idx / D, d = idx - v * D;
    const int r = v / hp, h = v - r * hp;
    float x = 0.f;
    if (v < nv && h < gp)
      x = to_float(query[(q0 + r0 + r) * p.q_stride_tok + int64_t(h0 + h) * p.q_stride_head +
                         int64_t(d) * p.q_stride_dim]) * qmul;
    Qs[v * DP + d] = x;
    Os[v * D + d] = 0.f;
  }
  for (int v = tid; v < QV; v += NT) {
    m_s[v] = kNegInf;
    l_s[v] = 0.f;
  }

  const int64_t row_stride = int64_t(p.num_kv_heads) * D;
  const CE* kc = static_cast<const CE*>(p.key_cache) + int64_t(kvh) * D;
  const CE* vc = static_cast<const CE*>(p.value_cache) + int64_t(kvh) * D;
  const BlockLookup look{p.block_table + int64_t(seq) * p.block_table_stride, p.block_size,
                         block_shift, p.num_blocks};
  const int KQ = KT / 4;
  const int units = (QV / 2) * KQ;  // score units: 2 vectors x 4 keys
  const int score_iters = (units * LPU + NT - 1) / NT;

  for (int64_t kb = k_lo; kb < k_hi; kb += KT) {
    const int nk = int(min(int64_t(KT), k_hi - kb));
    __syncthreads();  // the previous tile's readers are done with Ks, Vs, Ss

    // Gather the K/V tile; unreadable keys become zeros and are masked below.
    for (int idx = tid; idx < KT * nchunks; idx += NT) {
      const int j = idx / nchunks, c = idx - j * nchunks;
      const int64_t slot = j < nk ? look.slot(int(kb + j)) : -1;
      float kf[8], vf[8];
      if (slot >= 0) {
        Vec8<CT>::load(kc + slot * row_stride + c * 8, kf);
        Vec8<CT>::load(vc + slot * row_stride + c * 8, vf);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[e] = vf[e] = 0.f;
      }
      float4* kd = reinterpret_cast<float4*>(Ks + j * DP + c * 8);
      float4* vd = reinterpret_cast<float4*>(Vs + j * DP + c * 8);
      kd[0] = make_float4(kf[0], kf[1], kf[2], kf[3]);
      kd[1] = make_float4(kf[4], kf[5], kf[6], kf[7]);
      vd[0] = make_float4(vf[0], vf[1], vf[2], vf[3]);
      vd[1] = make_float4(vf[4], vf[5], vf[6], vf[7]);
      if (c == 0) kval[j] = slot >= 0;
    }
    __syncthreads();

    // Scores. Unit u: vectors 2vq, 2vq+1 x keys kq + KQ*{0,1,2,3} (interleaved keys keep
    // a warp's K reads on distinct banks), its dot products split over LPU lanes.
    for (int it = 0; it < score_iters; ++it) {
      const int w = it * NT + tid;
      const int u = w / LPU, sub = w - u * LPU;
      const bool active = u < units;
      const int kq = active ? u % KQ : 0, vq = active ? u / KQ : 0;
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      if (active && 2 * vq < nv) {
        const float4* qa = reinterpret_cast<const float4*>(Qs + (2 * vq) * DP);
        const float4* qb = reinterpret_cast<const float4*>(Qs + (2 * vq + 1) * DP);
        for (int d4 = sub; d4 < D4; d4 += LPU) {
          const float4 a = qa[d4], b = qb[d4];
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const float4 k4 = reinterpret_cast<const float4*>(Ks + (kq + KQ * kk) * DP)[d4];
            acc[0][kk] = dot4(a, k4, acc[0][kk]);
            acc[1][kk] = dot4(b, k4, acc[1][kk]);
          }
        }
      }
      if (LPU > 1) {  // LPU divides 32 and the trip count is uniform: whole warps shuffle
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int kk = 0; kk < 4; ++kk)
            for (int off = LPU >> 1; off > 0; off >>= 1)
              acc[a][kk] += __shfl_xor_sync(0xffffffffu, acc[a][kk], off);
      }
      if (active && sub == 0) {
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const int v = 2 * vq + a;
          const int r = v / hp, h = v - r * hp;
          const bool vec_ok = v < nv && h < gp;
          const int64_t pos = p_first + r;
          const float slope = (vec_ok && p.alibi_slopes) ? __ldg(p.alibi_slopes + h0 + h) : 0.f;
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const int j = kq + KQ * kk;
            const int64_t k = kb + j;
            const bool visible = vec_ok && j < nk && kval[j] &&
                                 (!causal || (k <= pos && (W <= 0 || k > pos - W)));
            Ss[v * KT + j] = visible ? finish_score(acc[a][kk], p.softcap, slope, k, pos) : kNegInf;
          }
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per vector (KT <= 32 keys: one per lane).
    for (int v = warp; v < QV; v += NW) {
      const float s = lane < KT ? Ss[v * KT + lane] : kNegInf;
      const float m_old = m_s[v];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float pr = s == kNegInf ? 0.f : expf(s - m_new);
      const float sum = warp_sum(pr);
      if (lane < KT) Ss[v * KT + lane] = pr;
      if (lane == 0) {
        const float alpha = m_old == kNegInf ? 0.f : expf(m_old - m_new);
        m_s[v] = m_new;
        l_s[v] = l_s[v] * alpha + sum;
        a_s[v] = alpha;
      }
    }
    __syncthreads();

    // O = O * alpha + P V. Unit: 4 vectors x 4 dims; consecutive threads take
    // consecutive dims, so V reads are conflict-free and P reads broadcast.
    for (int u = tid; u < (QV / 4) * D4; u += NT) {
      const int vq = u / D4, d4 = u - vq * D4;
      const int v0 = 4 * vq;
      if (v0 >= nv) continue;
      float4 o[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const float al = a_s[v0 + a];
        const float4 x = reinterpret_cast<const float4*>(Os + (v0 + a) * D)[d4];
        o[a] = make_float4(x.x * al, x.y * al, x.z * al, x.w * al);
      }
      for (int j = 0; j < nk; ++j) {
        const float4 vv = reinterpret_cast<const float4*>(Vs + j * DP)[d4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const float pr = Ss[(v0 + a) * KT + j];
          o[a].x = fmaf(pr, vv.x, o[a].x);
          o[a].y = fmaf(pr, vv.y, o[a].y);
          o[a].z = fmaf(pr, vv.z, o[a].z);
          o[a].w = fmaf(pr, vv.w, o[a].w);
        }
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) reinterpret_cast<float4*>(Os + (v0 + a) * D)[d4] = o[a];
    }
  }
  __syncthreads();

  const float vs = load_scale(p.v_scale);
  QE* out = static_cast<QE*>(p.out);
  for (int idx = tid; idx < QV * nchunks; idx += NT) {
    const int v = idx / nchunks, c = idx - v * nchunks;
    const int r = v / hp, h = v - r * hp;
    if (v >= nv || h >= gp) continue;
    const float l = l_s[v];
    const float inv = l > 0.f ? vs / l : 0.f;  // no visible key: 0
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = Os[v * D + c * 8 + e] * inv;
    Vec8<QT>::store(out + ((q0 + r0 + r) * p.num_heads + h0 + h) * D + c * 8, o);
  }
  if (p.lse) {
    for (int v = tid; v < nv; v += NT) {
      const int r = v / hp, h = v - r * hp;
      if (h < gp) p.lse[(q0 + r0 + r) * p.num_heads + h0 + h] = lse_of(m_s[v], l_s[v]);
    }
  }
}

template <typename Q, typename C, int HEAD>
cudaError_t prefill_launch_impl(const AttentionParams& p, const LaunchConfig& cfg,
                                cudaStream_t stream) {
  const int G = p.num_heads / p.num_kv_heads;
  const int hp = heads_per_cta(G);
  const int head_chunks = (G + hp - 1) / hp;
  const int tr = prefill_rows_per_tile(p.head_size, G);
  const size_t smem = prefill_smem_bytes(p.head_size);
  auto* kernel = prefill_kernel<Q, C, HEAD>;
  cudaError_t e = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  const int64_t tiles = int64_t(p.num_q_tokens) / tr + p.num_seqs;
  if (tiles == 0) return cudaSuccess;
  const dim3 grid(unsigned(tiles), unsigned(p.num_kv_heads * head_chunks));
  return launch_kernel("prefill_kernel", kernel, grid, dim3(cfg.prefill_threads), smem, stream, p,
                       hp, tr, log2_if_pow2(p.block_size));
}

template <typename Q, typename C>
cudaError_t launch_prefill(const AttentionParams& p, const LaunchConfig& cfg, bool generic,
                           cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_head_size(p.head_size, generic, [&](auto head) {
    err = prefill_launch_impl<Q, C, decltype(head)::value>(p, cfg, stream);
  });
  return err;
}

template <typename Q, typename C>
cudaError_t prefill_kernel_info(int head_size, bool generic, int threads, size_t smem,
                                KernelInfo* info) {
  cudaError_t err = cudaSuccess;
  with_head_size(head_size, generic, [&](auto head) {
    err = fill_kernel_info(reinterpret_cast<const void*>(prefill_kernel<Q, C, decltype(head)::value>),
                           threads, smem, info);
  });
  return err;
}

}  // namespace pagedkv::cuda

#define PAGEDKV_INSTANTIATE_PREFILL(Q, C)                                                      \
  template cudaError_t launch_prefill<Q, C>(const AttentionParams&, const LaunchConfig&, bool, \
                                            cudaStream_t);                                     \
  template cudaError_t prefill_kernel_info<Q, C>(int, bool, int, size_t, KernelInfo*);
