// Paged attention for decode: one query token per sequence against its cached K/V.
//
// Grid (num_seqs, num_kv_heads * head_chunks, num_partitions). A block takes one sequence,
// one KV head and up to G of the query heads that share it (grouped-query attention), so each
// K/V row is read once for G heads; it covers one partition (`partition_size` tokens) of the
// context. With more than one partition (split-K, "flash-decoding"), each block writes its
// normalized partial output, max and sum, and paged_attention_decode_reduce merges them.
//
// Inside a block, LANES consecutive lanes share a token: each loads 16 bytes of its K/V row,
// so a warp covers 32 / LANES tokens per step with coalesced 16-byte loads, and the q.k dot
// product is finished with LANES-wide xor shuffles. Scores live in shared memory.
#include "common.cuh"

#ifndef RS_HEAD_DIM
#error "compile with -DRS_HEAD_DIM=<head_dim>"
#endif
constexpr int HEAD_DIM = RS_HEAD_DIM;
static_assert(HEAD_DIM % VEC == 0 && HEAD_DIM <= 32 * VEC, "head_dim: multiple of 8, <= 256");

constexpr int NVEC = HEAD_DIM / VEC;  // 16-byte vectors in one K/V row
constexpr int LANES = NVEC <= 1 ? 1 : NVEC <= 2 ? 2 : NVEC <= 4 ? 4 : NVEC <= 8 ? 8
                    : NVEC <= 16 ? 16 : 32;  // lanes per token: NVEC rounded up to a power of 2
constexpr int TOKENS_PER_WARP = 32 / LANES;
constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int TOKENS_PER_STEP = NUM_WARPS * TOKENS_PER_WARP;
// K/V rows each lane has in flight at once: the paged gathers are latency-bound.
constexpr int UNROLL = 4;

template <int G>
__device__ __forceinline__ void decode_attention(
    scalar_t* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max,
    float* __restrict__ part_sum, const scalar_t* __restrict__ query,
    const scalar_t* __restrict__ k_cache, const scalar_t* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    float scale_log2, int num_q_heads, int num_kv_heads, long long query_stride,
    long long out_stride, int block_table_stride, int block_size, int partition_size,
    int max_partitions) {
  // Scores [G][partition_size], then probabilities, then [NUM_WARPS][G][HEAD_DIM] partial sums.
  RS_DYNAMIC_SMEM(smem_raw);
  float* logits = reinterpret_cast<float*>(smem_raw);
  __shared__ float red[NUM_WARPS][G];
  __shared__ float head_max[G], head_sum[G];

  const int seq = blockIdx.x;
  const int group = num_q_heads / num_kv_heads;
  const int chunks = (group + G - 1) / G;
  const int kv_head = blockIdx.y / chunks;
  const int head0 = kv_head * group + (blockIdx.y % chunks) * G;
  const int nheads = min(G, kv_head * group + group - head0);
  const int part = blockIdx.z;
  const bool split = part_out != nullptr;
  const int ctx = context_lens[seq];
  const int start = part * partition_size;
  const int tid = threadIdx.x;

  if (start >= ctx) {
    // Nothing to attend to. Without a split, an empty context gives zeros here; with one,
    // the reduce kernel writes them.
    if (!split && part == 0) {
      for (int i = tid; i < nheads * HEAD_DIM; i += NUM_THREADS)
        out[seq * out_stride + head0 * HEAD_DIM + i] = from_float<scalar_t>(0.f);
    }
    return;
  }
  const int n = min(start + partition_size, ctx) - start;
  const int lane = tid & 31, warp = tid >> 5;
  const int slot = lane / LANES;  // which of the warp's tokens this lane works on
  const int lv = lane % LANES;    // which 16-byte vector of the row
  const bool has_vec = lv < NVEC;

  // The query, pre-scaled so that exp2 of the score is the softmax numerator.
  float q[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < nheads && has_vec) {
      load_vec(query + seq * query_stride + (head0 + g) * HEAD_DIM + lv * VEC, q[g]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) q[g][i] *= scale_log2;
    } else {
      zero_vec(q[g]);
    }
  }

  const long long row_stride = (long long)num_kv_heads * HEAD_DIM;
  const long long block_stride = row_stride * block_size;
  const long long lane_offset = (long long)kv_head * HEAD_DIM + lv * VEC;
  const int* table = block_tables + (long long)seq * block_table_stride;

  // Phase 1: scores. Loop bounds depend only on the warp, so every lane reaches the shuffles.
  float tmax[G];
#pragma unroll
  for (int g = 0; g < G; ++g) tmax[g] = -RS_INF;
  for (int base = warp * TOKENS_PER_WARP; base < n; base += TOKENS_PER_STEP * UNROLL) {
    float k[UNROLL][VEC];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * TOKENS_PER_STEP + slot;
      if (t < n && has_vec) {
        const int token = start + t;
        const long long block = table[token / block_size];
        load_vec(k_cache + block * block_stride + (token % block_size) * row_stride + lane_offset,
                 k[u]);
      } else {
        zero_vec(k[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        s[g] = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[g] += q[g][i] * k[u][i];
#pragma unroll
        for (int m = LANES / 2; m > 0; m >>= 1) s[g] += __shfl_xor_sync(RS_FULL_MASK, s[g], m);
      }
      const int t = base + u * TOKENS_PER_STEP + slot;
      if (t < n) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          tmax[g] = fmaxf(tmax[g], s[g]);
          if (lv == 0) logits[g * partition_size + t] = s[g];
        }
      }
    }
  }

  // Phase 2: softmax over the partition, per head.
  float mx[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    tmax[g] = warp_max(tmax[g]);
    if (lane == 0) red[warp][g] = tmax[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    mx[g] = red[0][g];
#pragma unroll
    for (int w = 1; w < NUM_WARPS; ++w) mx[g] = fmaxf(mx[g], red[w][g]);
  }
  float lsum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) lsum[g] = 0.f;
  for (int t = tid; t < n; t += NUM_THREADS) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = exp2f(logits[g * partition_size + t] - mx[g]);
      logits[g * partition_size + t] = p;
      lsum[g] += p;
    }
  }
  __syncthreads();  // everyone has read red[] for the max before it is reused for the sums
#pragma unroll
  for (int g = 0; g < G; ++g) {
    lsum[g] = warp_sum(lsum[g]);
    if (lane == 0) red[warp][g] = lsum[g];
  }
  __syncthreads();  // also publishes the probabilities
  if (tid == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) s += red[w][g];
      head_max[g] = mx[g];
      head_sum[g] = s;
    }
  }

  // Phase 3: probabilities times V, each lane accumulating its 8 dims for every head.
  float acc[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) zero_vec(acc[g]);
  for (int base = warp * TOKENS_PER_WARP; base < n; base += TOKENS_PER_STEP * UNROLL) {
    float v[UNROLL][VEC];
    float p[UNROLL][G];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * TOKENS_PER_STEP + slot;
      if (t < n) {
#pragma unroll
        for (int g = 0; g < G; ++g) p[u][g] = logits[g * partition_size + t];
      } else {
#pragma unroll
        for (int g = 0; g < G; ++g) p[u][g] = 0.f;
      }
      if (t < n && has_vec) {
        const int token = start + t;
        const long long block = table[token / block_size];
        load_vec(v_cache + block * block_stride + (token % block_size) * row_stride + lane_offset,
                 v[u]);
      } else {
        zero_vec(v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] += p[u][g] * v[u][i];
  }
  // Sum over the warp's token slots (lanes LANES apart hold the same dims).
#pragma unroll
  for (int m = LANES; m < 32; m <<= 1)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] += __shfl_xor_sync(RS_FULL_MASK, acc[g][i], m);

  __syncthreads();  // the probabilities are consumed; reuse their memory for the warp sums
  float* warp_acc = logits;
  if (slot == 0 && has_vec) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) warp_acc[(warp * G + g) * HEAD_DIM + lv * VEC + i] = acc[g][i];
  }
  __syncthreads();
  for (int i = tid; i < nheads * HEAD_DIM; i += NUM_THREADS) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) o += warp_acc[(w * G + g) * HEAD_DIM + d];
    o /= head_sum[g];
    if (split) {
      part_out[(((long long)seq * num_q_heads + head0 + g) * max_partitions + part) * HEAD_DIM + d] = o;
    } else {
      out[seq * out_stride + (head0 + g) * HEAD_DIM + d] = from_float<scalar_t>(o);
    }
  }
  if (split && tid < nheads) {
    const long long idx = ((long long)seq * num_q_heads + head0 + tid) * max_partitions + part;
    part_max[idx] = head_max[tid];
    part_sum[idx] = head_sum[tid];
  }
}

#define RS_DECODE_KERNEL(G)                                                                      \
  extern "C" __global__ void __launch_bounds__(NUM_THREADS) paged_attention_decode_g##G(         \
      scalar_t* out, float* part_out, float* part_max, float* part_sum, const scalar_t* query,    \
      const scalar_t* k_cache, const scalar_t* v_cache, const int* block_tables,                 \
      const int* context_lens, float scale_log2, int num_q_heads, int num_kv_heads,              \
      long long query_stride, long long out_stride, int block_table_stride, int block_size,      \
      int partition_size, int max_partitions) {                                                  \
    decode_attention<G>(out, part_out, part_max, part_sum, query, k_cache, v_cache,              \
                        block_tables, context_lens, scale_log2, num_q_heads, num_kv_heads,       \
                        query_stride, out_stride, block_table_stride, block_size,                \
                        partition_size, max_partitions);                                         \
  }

RS_DECODE_KERNEL(1)
RS_DECODE_KERNEL(2)
RS_DECODE_KERNEL(4)
RS_DECODE_KERNEL(8)

// Merges the partitions of a split decode: grid (num_seqs, num_q_heads). Partition p's
// weight is sum_p * 2^(max_p - max); dynamic shared memory holds max_partitions floats.
extern "C" __global__ void __launch_bounds__(NUM_THREADS) paged_attention_decode_reduce(
    scalar_t* __restrict__ out, const float* __restrict__ part_out,
    const float* __restrict__ part_max, const float* __restrict__ part_sum,
    const int* __restrict__ context_lens, int num_q_heads, long long out_stride,
    int partition_size, int max_partitions) {
  RS_DYNAMIC_SMEM(smem_raw);
  float* weight = reinterpret_cast<float*>(smem_raw);
  __shared__ float scratch[32];
  const int seq = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int parts = (context_lens[seq] + partition_size - 1) / partition_size;
  const long long base = ((long long)seq * num_q_heads + head) * max_partitions;
  float m = -RS_INF;
  for (int p = tid; p < parts; p += NUM_THREADS) m = fmaxf(m, part_max[base + p]);
  m = block_max(m, scratch);
  float total = 0.f;
  for (int p = tid; p < parts; p += NUM_THREADS) {
    const float w = part_sum[base + p] * exp2f(part_max[base + p] - m);
    weight[p] = w;
    total += w;
  }
  total = block_sum(total, scratch);  // its barriers also publish weight[]
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = tid; d < HEAD_DIM; d += NUM_THREADS) {
    float o = 0.f;
    for (int p = 0; p < parts; ++p) o += weight[p] * part_out[(base + p) * HEAD_DIM + d];
    out[seq * out_stride + head * HEAD_DIM + d] = from_float<scalar_t>(o * inv);
  }
}
