// The quantized GEMM with fp32 activations (see quant_gemm.cpp for the int8-activation one).
#include <vector>

#include <omp.h>

#include "quant_blocks.h"

using namespace rs;

namespace {

// ------------------------------------------------------------------ fp32-activation path
//
// The same products with the activations left in fp32: a block's values are widened to fp32
// in registers and sum(W x) = d * sum(q x) + offset * sum(x), with sum(x) of each activation
// block computed once per call. Rounding is fp32's alone, so results track a
// dequantize-then-matmul reference to ~1e-6 (the int8 path: ~1e-2).

#if defined(__AVX2__)
template <int WType>
inline void widen_block(const uint8_t* w, int64_t b, __m256 q[4], float& dw, float& offset) {
  if constexpr (WType == kQ8_0) {
    const BlockQ8_0* wb = (const BlockQ8_0*)w + b;
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb->qs + 8 * i))));
    }
    dw = fp16_to_fp32(wb->d), offset = 0.0f;
  } else {
    const uint8_t* qs;
    if constexpr (WType == kQ4_0) {
      const BlockQ4_0* wb = (const BlockQ4_0*)w + b;
      qs = wb->qs, dw = fp16_to_fp32(wb->d), offset = -8.0f * dw;
    } else {
      const BlockQ4_1* wb = (const BlockQ4_1*)w + b;
      qs = wb->qs, dw = fp16_to_fp32(wb->d), offset = fp16_to_fp32(wb->m);
    }
    const __m128i t = _mm_loadu_si128((const __m128i*)qs), mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(t, mask), hi = _mm_and_si128(_mm_srli_epi16(t, 4), mask);
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}
#endif

template <int WType>
inline void widen_block_scalar(const uint8_t* w, int64_t b, float q[32], float& dw, float& offset) {
  if constexpr (WType == kQ8_0) {
    const BlockQ8_0* wb = (const BlockQ8_0*)w + b;
    for (int i = 0; i < QK; ++i) q[i] = (float)wb->qs[i];
    dw = fp16_to_fp32(wb->d), offset = 0.0f;
  } else {
    const uint8_t* qs;
    if constexpr (WType == kQ4_0) {
      const BlockQ4_0* wb = (const BlockQ4_0*)w + b;
      qs = wb->qs, dw = fp16_to_fp32(wb->d), offset = -8.0f * dw;
    } else {
      const BlockQ4_1* wb = (const BlockQ4_1*)w + b;
      qs = wb->qs, dw = fp16_to_fp32(wb->d), offset = fp16_to_fp32(wb->m);
    }
    for (int i = 0; i < 16; ++i) q[i] = (float)(qs[i] & 0x0f), q[i + 16] = (float)(qs[i] >> 4);
  }
}

template <int WType, int MT>
void dot_row_f32(const uint8_t* w, int64_t nb, const float* const* xs, const float* const* sums,
                 float* out) {
  float extra[MT];
  for (int t = 0; t < MT; ++t) extra[t] = 0.0f;
#if defined(__AVX2__)
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 q[4];
    float dw, offset;
    widen_block<WType>(w, b, q, dw, offset);
    const __m256 vd = _mm256_set1_ps(dw);
    for (int t = 0; t < MT; ++t) {
      const float* x = xs[t] + b * QK;
      __m256 s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
      __m256 s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(x + 8));
      s0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), s0);
      s1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), s1);
      acc[t] = _mm256_fmadd_ps(vd, _mm256_add_ps(s0, s1), acc[t]);
      if constexpr (WType != kQ8_0) extra[t] += offset * sums[t][b];
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = hsum(acc[t]) + extra[t];
#else
  float acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    float q[32], dw, offset;
    widen_block_scalar<WType>(w, b, q, dw, offset);
    for (int t = 0; t < MT; ++t) {
      const float* x = xs[t] + b * QK;
      float s = 0.0f;
      for (int i = 0; i < QK; ++i) s += q[i] * x[i];
      acc[t] += dw * s;
      if constexpr (WType != kQ8_0) extra[t] += offset * sums[t][b];
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = acc[t] + extra[t];
#endif
}

template <int WType>
void gemm_f32(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
              float* y, int64_t ldy, int nthreads) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  static thread_local std::vector<float> block_sums;
  if ((int64_t)block_sums.size() < m * nb) block_sums.resize(m * nb);
  float* sums = block_sums.data();
  for (int64_t i = 0; i < m * nb; ++i) {
    const float* xb = x + (i / nb) * ldx + (i % nb) * QK;
    float s = 0.0f;
    for (int j = 0; j < QK; ++j) s += xb[j];
    sums[i] = s;
  }
  const bool parallel = nthreads > 1 && n * k * (m < 4 ? m : 4) >= (1 << 18);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (parallel)
  for (int64_t r0 = 0; r0 < n; r0 += 16) {
    const int64_t r1 = r0 + 16 < n ? r0 + 16 : n;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + r * row_bytes;
      for (int64_t i0 = 0; i0 < m; i0 += kTile) {
        const int mt = (int)(m - i0 < kTile ? m - i0 : kTile);
        const float* xs[kTile];
        const float* ss[kTile];
        float out[kTile];
        for (int t = 0; t < mt; ++t) xs[t] = x + (i0 + t) * ldx, ss[t] = sums + (i0 + t) * nb;
        switch (mt) {
          case 1: dot_row_f32<WType, 1>(wr, nb, xs, ss, out); break;
          case 2: dot_row_f32<WType, 2>(wr, nb, xs, ss, out); break;
          case 3: dot_row_f32<WType, 3>(wr, nb, xs, ss, out); break;
          default: dot_row_f32<WType, 4>(wr, nb, xs, ss, out); break;
        }
        for (int t = 0; t < mt; ++t) y[(i0 + t) * ldy + r] = out[t];
      }
    }
  }
}

}  // namespace

extern "C" {

// rs_gemm with the activations kept in fp32 (no int8 rounding). 0 on success.
int rs_gemm_f32(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                int64_t ldx, float* y, int64_t ldy, int nthreads) {
  if (k % QK != 0 || nthreads < 1) return 1;
  switch (wtype) {
    case kQ4_0: gemm_f32<kQ4_0>(w, n, k, x, m, ldx, y, ldy, nthreads); return 0;
    case kQ4_1: gemm_f32<kQ4_1>(w, n, k, x, m, ldx, y, ldy, nthreads); return 0;
    case kQ8_0: gemm_f32<kQ8_0>(w, n, k, x, m, ldx, y, ldy, nthreads); return 0;
    default: return 2;
  }
}

}  // extern "C"
