// Weight-only quantized GEMV/GEMM over GGUF block formats (Q4_0, Q4_1, Q8_0), fp32 in and out.
//
// As llama.cpp's ggml_vec_dot_q4_1_q8_1: each activation row is quantized on the fly to blocks
// of 32 int8 values with an fp32 scale d and s = d * sum(q); a weight block dots with it in
// int8 (AVX2 maddubs, or AVX512-VNNI dpbusd on ymm where the CPU has it) and the block's
// offset (Q4_1's m, Q4_0's -8) enters through s. Threads split the output rows (OpenMP: the
// same libgomp runtime torch loaded, so one thread pool); the summation order of a row does
// not depend on the thread count.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "quant_blocks.h"

using namespace rs;

namespace {

// ------------------------------------------------------------------ activation quantization

void quantize_row(const float* x, int64_t k, BlockQ8X* out) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
#if defined(__AVX2__)
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float max_abs = _mm_cvtss_f32(m4);
    const float d = max_abs / 127.0f;
    const __m256 id = _mm256_set1_ps(max_abs != 0.0f ? 127.0f / max_abs : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
    }
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
    __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    __m256i p = _mm256_packs_epi16(p01, p23);
    // packs works within 128-bit lanes: put the 8 groups of 4 back in order.
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)out[b].qs, p);
    out[b].d = d;
    out[b].s = d * (float)_mm_cvtsi128_si32(s4);
#else
    float max_abs = 0.0f;
    for (int i = 0; i < QK; ++i) max_abs = std::fmax(max_abs, std::fabs(xb[i]));
    const float d = max_abs / 127.0f, id = max_abs != 0.0f ? 127.0f / max_abs : 0.0f;
    int sum = 0;
    for (int i = 0; i < QK; ++i) {
      const int q = (int)std::nearbyint(xb[i] * id);
      out[b].qs[i] = (int8_t)q;
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * (float)sum;
#endif
  }
}

// ------------------------------------------------------------------ block dot products

#if defined(__AVX2__)
inline __m256i unpack_nibbles(const uint8_t* qs) {  // 16 bytes -> 32 values 0..15, in order
  const __m128i t = _mm_loadu_si128((const __m128i*)qs);
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

inline __m256 dot_u8_s8(__m256i u, __m256i s) {  // 32 u8*s8 products summed in 8 int32 lanes
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#else
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}
#endif

#if defined(__AVX2__)
// One weight block unpacked: values (Q8_0: their absolute values), scale, offset factor.
template <int WType>
inline void load_block(const uint8_t* w, int64_t b, __m256i& qw, __m256i& sign, float& dw,
                       float& offset) {
  const uint8_t* qs = block_fields<WType>(w, b, dw, offset);
  if constexpr (WType == kQ8_0) {
    sign = _mm256_loadu_si256((const __m256i*)qs);
    qw = _mm256_sign_epi8(sign, sign);
  } else {
    qw = unpack_nibbles(qs);
  }
}

template <int WType>
inline __m256 block_dot(__m256i qw, __m256i sign, const BlockQ8X& xb) {
  __m256i qx = _mm256_loadu_si256((const __m256i*)xb.qs);
  if constexpr (WType == kQ8_0) qx = _mm256_sign_epi8(qx, sign);
  return dot_u8_s8(qw, qx);
}
#endif

// out[t] for t < MT: weight row `w` (nb blocks) dotted with MT quantized activation rows.
template <int WType, int MT>
void dot_row(const uint8_t* w, int64_t nb, const BlockQ8X* const* xs, float* out) {
#if defined(__AVX2__)
  // Two accumulator sets (even and odd blocks): the FMA chains' latency overlaps.
  __m256 acc[2][MT], extra[2][MT];
  for (int t = 0; t < MT; ++t) {
    acc[0][t] = acc[1][t] = extra[0][t] = extra[1][t] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    for (int j = 0; j < 2; ++j) {
      __m256i qw, sign;
      float dw, offset;
      load_block<WType>(w, b + j, qw, sign, dw, offset);
      const __m256 vdw = _mm256_set1_ps(dw), voff = _mm256_set1_ps(offset);
      for (int t = 0; t < MT; ++t) {
        const BlockQ8X& xb = xs[t][b + j];
        acc[j][t] = _mm256_fmadd_ps(_mm256_mul_ps(vdw, _mm256_set1_ps(xb.d)),
                                    block_dot<WType>(qw, sign, xb), acc[j][t]);
        if constexpr (WType != kQ8_0) {
          extra[j][t] = _mm256_fmadd_ps(voff, _mm256_set1_ps(xb.s), extra[j][t]);
        }
      }
    }
  }
  for (; b < nb; ++b) {
    __m256i qw, sign;
    float dw, offset;
    load_block<WType>(w, b, qw, sign, dw, offset);
    for (int t = 0; t < MT; ++t) {
      const BlockQ8X& xb = xs[t][b];
      acc[0][t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), block_dot<WType>(qw, sign, xb),
                                  acc[0][t]);
      if constexpr (WType != kQ8_0) {
        extra[0][t] = _mm256_add_ps(_mm256_set1_ps(offset * xb.s), extra[0][t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) {
    // extra holds the same scalar in every lane: take lane 0.
    const float e = _mm256_cvtss_f32(_mm256_add_ps(extra[0][t], extra[1][t]));
    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + e;
  }
#else
  for (int t = 0; t < MT; ++t) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const BlockQ8X& xb = xs[t][b];
      float dw, offset;
      const uint8_t* qs = block_fields<WType>(w, b, dw, offset);
      int dot = 0;
      if constexpr (WType == kQ8_0) {
        for (int i = 0; i < QK; ++i) dot += (int8_t)qs[i] * xb.qs[i];
      } else {
        for (int i = 0; i < 16; ++i) dot += (qs[i] & 0x0f) * xb.qs[i] + (qs[i] >> 4) * xb.qs[i + 16];
      }
      sum += dw * xb.d * (float)dot + offset * xb.s;
    }
    out[t] = sum;
  }
#endif
}

template <int WType>
inline void dot_rows(const uint8_t* w, int64_t nb, const BlockQ8X* const* xs, int mt,
                     float* out) {
  switch (mt) {
    case 1: dot_row<WType, 1>(w, nb, xs, out); break;
    case 2: dot_row<WType, 2>(w, nb, xs, out); break;
    case 3: dot_row<WType, 3>(w, nb, xs, out); break;
    default: dot_row<WType, 4>(w, nb, xs, out); break;
  }
}

template <int WType>
void gemm(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
          float* y, int64_t ldy, int nthreads) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  static thread_local std::vector<BlockQ8X> xq;
  if ((int64_t)xq.size() < m * nb) xq.resize(m * nb);
  BlockQ8X* xqp = xq.data();
  for (int64_t i = 0; i < m; ++i) quantize_row(x + i * ldx, k, xqp + i * nb);
  for_row_chunks(0, n, 16, nthreads, worth_threads(n, k, m, nthreads), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + r * row_bytes;
      for (int64_t i0 = 0; i0 < m; i0 += kTile) {
        const int mt = (int)(m - i0 < kTile ? m - i0 : kTile);
        const BlockQ8X* xs[kTile];
        float out[kTile];
        for (int t = 0; t < mt; ++t) xs[t] = xqp + (i0 + t) * nb;
        dot_rows<WType>(wr, nb, xs, mt, out);
        for (int t = 0; t < mt; ++t) y[(i0 + t) * ldy + r] = out[t];
      }
    }
  });
}

}  // namespace
extern "C" {

// 0 scalar, 1 AVX2, 2 AVX2 with AVX512-VNNI dot products.
int rs_simd_level() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

// y[m, n] = x[m, k] @ W[n, k].T, W in ggml type wtype (rows of k/32 blocks). 0 on success.
int rs_gemm(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
            int64_t ldx, float* y, int64_t ldy, int nthreads) {
  if (k % QK != 0 || nthreads < 1) return 1;
  return with_wtype(wtype, [&](auto t) { gemm<decltype(t)::value>(w, n, k, x, m, ldx, y, ldy, nthreads); });
}

// out[i, :] = dequantized row rows[i] of W (rows == nullptr: rows 0..n_rows-1). 0 on success.
int rs_dequant_rows(int wtype, const uint8_t* w, int64_t k, const int64_t* rows, int64_t n_rows,
                    float* out, int nthreads) {
  const int64_t bb = block_bytes(wtype);
  if (bb == 0) return 2;
  if (k % QK != 0 || nthreads < 1) return 1;
  const int64_t row_bytes = k / QK * bb;
  return with_wtype(wtype, [&](auto t) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n_rows > 64)
    for (int64_t i = 0; i < n_rows; ++i) {
      dequant_row<decltype(t)::value>(w + (rows ? rows[i] : i) * row_bytes, k, out + i * k);
    }
  });
}

// The same rows rounded to bf16 (round to nearest even, as torch's float -> bfloat16): the
// weight tiles of a bf16 matmul (quant_layers.py), half the bytes of fp32 ones.
int rs_dequant_rows_bf16(int wtype, const uint8_t* w, int64_t k, const int64_t* rows,
                         int64_t n_rows, uint16_t* out, int nthreads) {
  const int64_t bb = block_bytes(wtype);
  if (bb == 0) return 2;
  if (k % QK != 0 || nthreads < 1) return 1;
  const int64_t row_bytes = k / QK * bb;
  return with_wtype(wtype, [&](auto t) {
#pragma omp parallel num_threads(nthreads) if (n_rows > 64)
    {
      std::vector<float> row(k);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n_rows; ++i) {
        dequant_row<decltype(t)::value>(w + (rows ? rows[i] : i) * row_bytes, k, row.data());
        fp32_to_bf16(row.data(), k, out + i * k);
      }
    }
  });
}

}  // extern "C"
