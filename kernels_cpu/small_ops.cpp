// The decode step's small fused ops in fp32: residual add + RMSNorm, rotate-half RoPE, SwiGLU.
//
// Each is a handful of torch ops (F.rms_norm alone is ~40 us a call on a [1, 576] row here,
// against ~1 us of arithmetic), run ~150 times a step: one call each instead. Rows split
// over threads only when a step has enough of them to pay for waking a thread.
#include <cmath>
#include <cstdint>

#include <omp.h>

#include "simd.h"

using namespace rs;

namespace {


inline bool worth_threads(int64_t rows, int64_t width, int nthreads) {
  return nthreads > 1 && rows * width >= (1 << 16);
}

}  // namespace

extern "C" {

// residual_out = x + residual (x alone when residual is null); out = residual_out
// * rsqrt(mean(residual_out^2) + eps) * weight. Rows of h; out may alias x.
void rs_add_rms_norm(const float* x, const float* residual, const float* weight, float* out,
                     float* residual_out, int64_t rows, int64_t h, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (worth_threads(rows, h, nthreads))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * h;
    float* rr = residual_out + r * h;
    float ss = 0.0f;
    int64_t i0 = 0;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i0 + 8 <= h; i0 += 8) {
      __m256 v = _mm256_loadu_ps(xr + i0);
      if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + r * h + i0));
      _mm256_storeu_ps(rr + i0, v);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    ss = hsum(acc);
#endif
    for (int64_t i = i0; i < h; ++i) {
      const float v = residual ? xr[i] + residual[r * h + i] : xr[i];
      rr[i] = v;
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / (float)h + eps);
    float* o = out + r * h;
    int64_t j0 = 0;
#if defined(__AVX2__)
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; j0 + 8 <= h; j0 += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(rr + j0), vinv);
      _mm256_storeu_ps(o + j0, _mm256_mul_ps(v, _mm256_loadu_ps(weight + j0)));
    }
#endif
    for (int64_t i = j0; i < h; ++i) o[i] = rr[i] * inv * weight[i];
  }
}

// In place on x [T, heads, head_dim] (row stride ldx, head stride head_dim): each head's
// halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin [T, head_dim / 2].
void rs_rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t ldx,
             const float* cos, const float* sin, int nthreads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (worth_threads(tokens, heads * head_dim, nthreads))
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* x1 = x + t * ldx + hh * head_dim;
      float* x2 = x1 + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i], b = x2[i];
        x1[i] = a * c[i] - b * s[i];
        x2[i] = b * c[i] + a * s[i];
      }
    }
  }
}

// out [T, n] = silu(x[:, :n]) * x[:, n:] for x [T, 2n].
void rs_silu_and_mul(const float* x, float* out, int64_t tokens, int64_t n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (worth_threads(tokens, n, nthreads))
  for (int64_t t = 0; t < tokens; ++t) {
    const float* g = x + t * 2 * n;
    const float* u = g + n;
    float* o = out + t * n;
    int64_t i0 = 0;
#if defined(__AVX2__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i0 + 8 <= n; i0 += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i0);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
      _mm256_storeu_ps(o + i0, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i0)));
    }
#endif
    for (int64_t i = i0; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

}  // extern "C"
