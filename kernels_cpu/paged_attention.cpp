// Decode attention over the paged KV cache, read in place (no gather into a contiguous copy).
//
// One query token a row; K/V pools [num_blocks, block_size, kv_heads, head_dim] fp32; a row's
// token t lives at block_table[row][t / block_size], slot t % block_size. The mask is the
// caller's additive bias [rows, width * block_size] (0 or -inf), the same one torch's masked
// SDPA takes, so both paths attend to exactly the same keys. Two passes per (row, KV head):
// scores for the head's query heads, then a softmax-weighted sum of the values. Threads
// split the (row, KV head) pairs.
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <omp.h>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 h = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

extern "C" int rs_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                                         const int64_t* block_ids, const float* bias, int64_t rows,
                                         int64_t width, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, int64_t block_size, float scale,
                                         float* out, int nthreads) {
  if (kv_heads < 1 || heads % kv_heads != 0 || nthreads < 1) return 1;
  const int64_t group = heads / kv_heads, ctx = width * block_size;
#pragma omp parallel num_threads(nthreads) if (rows * kv_heads > 1)
  {
    std::vector<float> scores(group * ctx);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * kv_heads; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const float* brow = bias + r * ctx;
      const int64_t* bt = block_ids + r * width;
      for (int64_t j = 0; j < group; ++j) {
        const float* qh = q + (r * heads + g * group + j) * head_dim;
        float* s = scores.data() + j * ctx;
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctx; ++t) {
          if (std::isinf(brow[t]) && brow[t] < 0) {
            s[t] = -INFINITY;
            continue;
          }
          const float* kt = k_cache + ((bt[t / block_size] * block_size + t % block_size) * kv_heads + g) * head_dim;
          s[t] = dot(qh, kt, head_dim) * scale + brow[t];
          mx = s[t] > mx ? s[t] : mx;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < ctx; ++t) {
          s[t] = std::isinf(s[t]) ? 0.0f : std::exp(s[t] - mx);
          sum += s[t];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        float* o = out + (r * heads + g * group + j) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.0f;
        for (int64_t t = 0; t < ctx; ++t) {
          if (s[t] == 0.0f) continue;
          const float p = s[t] * inv;
          const float* vt = v_cache + ((bt[t / block_size] * block_size + t % block_size) * kv_heads + g) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) o[d] += p * vt[d];
        }
      }
    }
  }
  return 0;
}
