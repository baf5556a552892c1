// Paged attention for prefill and chunked prefill over a cached prefix (variable length).
//
// Sequence s has q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s] new query tokens and ctx =
// context_lens[s] tokens in the cache (its prefix plus the new tokens, already written).
// New token i sits at position ctx - q_len + i and attends causally to tokens 0..that position.
//
// Grid (row_tiles, num_kv_heads, num_seqs). The rows of a block are (token, head) pairs of
// the query heads sharing one KV head, flattened as token * G + g, so the K/V tiles staged in
// shared memory serve all G heads. Flash-attention 2 style on the tensor cores (mma.sync
// m16n8k16, fp32 accumulation): each of the 4 warps owns 16 query rows; per K/V tile of
// BLOCK_N tokens it computes S = Q K^T, applies the causal mask and an online softmax in
// registers, and reuses the S accumulators directly as the A operand of O += P V.
#include "common.cuh"

#ifndef RS_HEAD_DIM
#error "compile with -DRS_HEAD_DIM=<head_dim>"
#endif
constexpr int HEAD_DIM = RS_HEAD_DIM;
static_assert(HEAD_DIM % 16 == 0 && HEAD_DIM <= 256, "head_dim: multiple of 16, <= 256");

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int BLOCK_M = NUM_WARPS * 16;  // query rows per block
constexpr int BLOCK_N = 64;              // keys per K/V tile
constexpr int NVEC = HEAD_DIM / VEC;     // 16-byte vectors per row
constexpr int S_TILES = BLOCK_N / 8;     // n-tiles of S per warp
constexpr int O_TILES = HEAD_DIM / 8;    // n-tiles of O per warp
// Rows padded by 16 bytes: the 8 rows a fragment load touches fall in distinct banks.
constexpr int STRIDE = HEAD_DIM + VEC;

// Dynamic shared memory: Q, K and V tiles (the host computes the same).
constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * STRIDE * 2;

__device__ __forceinline__ unsigned load_pair(const scalar_t* p) {
  return *reinterpret_cast<const unsigned*>(p);
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS) paged_attention_prefill(
    scalar_t* __restrict__ out,            // [num_tokens, num_q_heads, head_dim]
    const scalar_t* __restrict__ query,    // [num_tokens, num_q_heads, head_dim]
    const scalar_t* __restrict__ k_cache,  // [num_blocks, block_size, num_kv_heads, head_dim]
    const scalar_t* __restrict__ v_cache,
    const int* __restrict__ block_tables,  // [num_seqs, block_table_stride]
    const int* __restrict__ cu_seqlens_q,  // [num_seqs + 1]
    const int* __restrict__ context_lens,  // [num_seqs]
    float scale_log2, int num_q_heads, int num_kv_heads, long long query_stride,
    long long out_stride, int block_table_stride, int block_size) {
  RS_DYNAMIC_SMEM(smem_raw);
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem_raw);  // [BLOCK_M][STRIDE]
  scalar_t* k_tile = q_tile + BLOCK_M * STRIDE;               // [BLOCK_N][STRIDE]
  scalar_t* v_tile = k_tile + BLOCK_N * STRIDE;               // [BLOCK_N][STRIDE]

  const int seq = blockIdx.z, kv_head = blockIdx.y;
  const int q_start = cu_seqlens_q[seq];
  const int q_len = cu_seqlens_q[seq + 1] - q_start;
  const int group = num_q_heads / num_kv_heads;
  const int rows_total = q_len * group;
  const int row0 = blockIdx.x * BLOCK_M;
  if (row0 >= rows_total) return;
  const int ctx = context_lens[seq];
  const int prefix = ctx - q_len;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int warp_row = warp * 16;         // first of this warp's rows within the block

  // Stage the block's query rows; rows past the sequence are zero.
  for (int i = tid; i < BLOCK_M * NVEC; i += NUM_THREADS) {
    const int r = i / NVEC, v = i % NVEC, row = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row < rows_total) {
      const int tok = row / group, h = kv_head * group + row % group;
      val = *reinterpret_cast<const uint4*>(query + (long long)(q_start + tok) * query_stride +
                                            h * HEAD_DIM + v * VEC);
    }
    *reinterpret_cast<uint4*>(q_tile + r * STRIDE + v * VEC) = val;
  }

  // This thread's two rows (fragment rows g and g + 8): the last key each may see, -1 past
  // the sequence.
  int limit[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + warp_row + g + 8 * h;
    limit[h] = row < rows_total ? prefix + row / group : -1;
  }
  const int last_row = min(row0 + BLOCK_M, rows_total) - 1;
  const int kv_end = min(ctx, prefix + last_row / group + 1);

  float m[2] = {-RS_INF, -RS_INF}, l[2] = {0.f, 0.f};
  float o[O_TILES][4];
#pragma unroll
  for (int j = 0; j < O_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  const long long row_stride = (long long)num_kv_heads * HEAD_DIM;
  const long long block_stride = row_stride * block_size;
  const int* table = block_tables + (long long)seq * block_table_stride;
  const scalar_t* q_frag = q_tile + (warp_row + g) * STRIDE + 2 * t;
  const unsigned short* v_bits = reinterpret_cast<const unsigned short*>(v_tile);

  for (int kv0 = 0; kv0 < kv_end; kv0 += BLOCK_N) {
    __syncthreads();  // the previous tile is no longer read
    for (int i = tid; i < BLOCK_N * NVEC; i += NUM_THREADS) {
      const int n = i / NVEC, v = i % NVEC, token = kv0 + n;
      uint4 kval = make_uint4(0u, 0u, 0u, 0u), vval = kval;
      if (token < kv_end) {
        const long long off = table[token / block_size] * block_stride +
                              (token % block_size) * row_stride + kv_head * HEAD_DIM + v * VEC;
        kval = *reinterpret_cast<const uint4*>(k_cache + off);
        vval = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      *reinterpret_cast<uint4*>(k_tile + n * STRIDE + v * VEC) = kval;
      *reinterpret_cast<uint4*>(v_tile + n * STRIDE + v * VEC) = vval;
    }
    __syncthreads();

    // S = Q K^T: 16 rows x BLOCK_N keys per warp. K rows are B's columns (col-major B).
    float s[S_TILES][4];
#pragma unroll
    for (int j = 0; j < S_TILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int k = 0; k < HEAD_DIM; k += 16) {
      const unsigned a[4] = {load_pair(q_frag + k), load_pair(q_frag + 8 * STRIDE + k),
                             load_pair(q_frag + k + 8), load_pair(q_frag + 8 * STRIDE + k + 8)};
#pragma unroll
      for (int j = 0; j < S_TILES; ++j) {
        const scalar_t* k_frag = k_tile + (j * 8 + g) * STRIDE + k + 2 * t;
        const unsigned b[2] = {load_pair(k_frag), load_pair(k_frag + 8)};
        mma_16816(s[j], a, b);
      }
    }

    // Causal mask and online softmax. Element e of s[j] is row g + 8 * (e / 2), key
    // kv0 + 8j + 2t + e % 2; the 4 lanes of a row (same g) combine with xor 1 and 2.
    float tile_max[2] = {-RS_INF, -RS_INF};
#pragma unroll
    for (int j = 0; j < S_TILES; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = key <= limit[e >> 1] ? s[j][e] * scale_log2 : -RS_INF;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
      }
    float m_ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(RS_FULL_MASK, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(RS_FULL_MASK, tile_max[h], 2));
      const float m_new = fmaxf(m[h], tile_max[h]);
      // A row with nothing visible yet keeps m = -inf; subtracting 0 avoids inf - inf.
      m_ref[h] = m_new == -RS_INF ? 0.f : m_new;
      const float alpha = exp2f(m[h] - m_ref[h]);
      m[h] = m_new;
      l[h] *= alpha;
#pragma unroll
      for (int j = 0; j < O_TILES; ++j) {
        o[j][2 * h] *= alpha;
        o[j][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < S_TILES; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - m_ref[e >> 1]);
        l[e >> 1] += s[j][e];  // this lane's share of the row sum
      }

    // O += P V. The S accumulators of key tiles 2kk and 2kk+1 are exactly the A fragment
    // of keys 16kk..16kk+15; V's B fragment pairs two keys of one dim (16-bit loads).
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      const unsigned a[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                             pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const unsigned short* v0 = v_bits + (kk * 16 + 2 * t) * STRIDE + g;
#pragma unroll
      for (int j = 0; j < O_TILES; ++j) {
        const unsigned short* vj = v0 + j * 8;
        const unsigned b[2] = {
            vj[0] | (static_cast<unsigned>(vj[STRIDE]) << 16),
            vj[8 * STRIDE] | (static_cast<unsigned>(vj[9 * STRIDE]) << 16)};
        mma_16816(o[j], a, b);
      }
    }
  }

  // Finish the row sums across the row's 4 lanes; write the rows that exist, two dims a store.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(RS_FULL_MASK, l[h], 1);
    l[h] += __shfl_xor_sync(RS_FULL_MASK, l[h], 2);
    const int row = row0 + warp_row + g + 8 * h;
    if (row >= rows_total) continue;
    const int tok = row / group, head = kv_head * group + row % group;
    scalar_t* dst = out + (long long)(q_start + tok) * out_stride + head * HEAD_DIM + 2 * t;
    const float inv = 1.f / l[h];
#pragma unroll
    for (int j = 0; j < O_TILES; ++j)
      *reinterpret_cast<unsigned*>(dst + j * 8) = pack2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
  }
}
