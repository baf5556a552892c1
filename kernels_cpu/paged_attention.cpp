// Decode attention over the paged KV cache, read in place (no gather into a contiguous copy).
//
// One query token a row; K/V pools [num_blocks, block_size, kv_heads, head_dim] fp32; a row's
// token t lives at block_table[row][t / block_size], slot t % block_size. The mask is the
// caller's additive bias [rows, width * block_size] (0 or -inf), the same one torch's masked
// SDPA takes, so both paths attend to exactly the same keys. Two passes per (row, KV head):
// scores for the head's query heads (each key read once for all of them), then a
// softmax-weighted sum of the values. Slots are walked block by block (no division per key)
// and exp runs 8 lanes at a time. Threads split the (row, KV head) pairs.
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "simd.h"

using namespace rs;

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// s[t] = exp(s[t] - mx) (a masked score, -inf, gives 0); returns the sum.
inline float exp_and_sum(float* s, int64_t n, float mx) {
  int64_t t = 0;
  float sum = 0.0f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= n; t += 8) {
    const __m256 v = _mm256_loadu_ps(s + t);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, vmx)));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; t < n; ++t) {
    s[t] = std::isinf(s[t]) ? 0.0f : std::exp(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

// o[d] = inv * sum_t p[t] * v_t[d] over the context's value rows (walked block by block), for
// one query head: the sums stay in registers, 32 lanes of head_dim at a time.
inline void weighted_values(const float* p, const float* v_cache, const int64_t* bt, int64_t width,
                            int64_t block_size, int64_t slot_stride, int64_t head_offset,
                            int64_t head_dim, float inv, float* o) {
  int64_t d0 = 0;
#if defined(__AVX2__)
  for (; d0 + 32 <= head_dim; d0 += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < width; ++b) {
      const float* vb = v_cache + bt[b] * block_size * slot_stride + head_offset + d0;
      for (int64_t i = 0; i < block_size; ++i) {
        const float pt = p[b * block_size + i];
        if (pt == 0.0f) continue;
        const __m256 vp = _mm256_set1_ps(pt);
        const float* vt = vb + i * slot_stride;
        for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(vp, _mm256_loadu_ps(vt + 8 * c), acc[c]);
      }
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + d0 + 8 * c, _mm256_mul_ps(acc[c], vinv));
  }
#endif
  for (int64_t d = d0; d < head_dim; ++d) o[d] = 0.0f;
  if (d0 == head_dim) return;
  for (int64_t b = 0; b < width; ++b) {
    const float* vb = v_cache + bt[b] * block_size * slot_stride + head_offset;
    for (int64_t i = 0; i < block_size; ++i) {
      const float pt = p[b * block_size + i];
      if (pt == 0.0f) continue;
      const float* vt = vb + i * slot_stride;
      for (int64_t d = d0; d < head_dim; ++d) o[d] += pt * vt[d];
    }
  }
  for (int64_t d = d0; d < head_dim; ++d) o[d] *= inv;
}

}  // namespace

extern "C" int rs_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                                         const int64_t* block_ids, const float* bias, int64_t rows,
                                         int64_t width, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t block_size, float scale,
                                         float* out, int nthreads) {
  if (kv_heads < 1 || heads % kv_heads != 0 || nthreads < 1) return 1;
  const int64_t group = heads / kv_heads, ctx = width * block_size;
  const int64_t slot_stride = kv_heads * head_dim;  // floats from one token's K row to the next
#pragma omp parallel num_threads(nthreads) if (rows * kv_heads > 1 && rows * ctx >= 512)
  {
    std::vector<float> scores(group * ctx);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * kv_heads; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const float* brow = bias + r * ctx;
      const int64_t* bt = block_ids + r * width;
      const float* qh = q + (r * heads + g * group) * head_dim;
      float* s = scores.data();
      // Scores: each key once, for every query head of the group.
      for (int64_t b = 0; b < width; ++b) {
        const float* kb = k_cache + (bt[b] * block_size * kv_heads + g) * head_dim;
        for (int64_t i = 0; i < block_size; ++i) {
          const int64_t t = b * block_size + i;
          const bool masked = std::isinf(brow[t]) && brow[t] < 0;
          const float* kt = kb + i * slot_stride;
          for (int64_t j = 0; j < group; ++j) {
            s[j * ctx + t] = masked ? -INFINITY : dot(qh + j * head_dim, kt, head_dim) * scale + brow[t];
          }
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* sj = s + j * ctx;
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctx; ++t) mx = sj[t] > mx ? sj[t] : mx;
        const float sum = mx == -INFINITY ? 0.0f : exp_and_sum(sj, ctx, mx);
        if (mx == -INFINITY) {
          for (int64_t t = 0; t < ctx; ++t) sj[t] = 0.0f;
        }
        weighted_values(sj, v_cache, bt, width, block_size, slot_stride, g * head_dim, head_dim,
                        sum > 0.0f ? 1.0f / sum : 0.0f, out + (r * heads + g * group + j) * head_dim);
      }
    }
  }
  return 0;
}
