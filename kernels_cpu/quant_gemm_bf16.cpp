// The quantized GEMM in bf16 (AVX512-BF16): y = x @ W.T with x rounded to bf16, W's blocks
// dequantized (fp32, as dequant_row) and rounded to bf16, products summed in fp32 by
// vdpbf16ps, y written in fp32. What a bf16 matmul of a step of many rows runs on a CPU that
// has the instruction (quant_layers.py: matmul_dtype bfloat16), in place of oneDNN's bf16
// matmul over a dequantized tile: no separate dequantization pass, no weight reorder, no bf16
// result to widen back (those cost oneDNN's path half its time on a 32-row decode step).
//
// Each thread takes 32 weight rows (output columns) at a time, dequantizes them into a
// panel in the instruction's layout, [k / 2][32 columns] pairs of bf16 (a 16 x 16 transpose
// of 32-bit pairs per 16 rows and block), and runs an outer-product micro-kernel over it:
// MT activation rows x 32 columns, 2 * MT fp32 accumulators, one broadcast pair of x a row
// and two panel loads a k pair. Without AVX512-BF16 the entry point returns 3 and the caller
// takes the oneDNN path.
#include <cstdint>
#include <vector>

#include <omp.h>

#include "quant_blocks.h"

using namespace rs;

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
namespace {

constexpr int kPanelCols = 32;
constexpr int kMaxRows = 12;  // rows a pass: 24 accumulators, 2 panel vectors, 1 broadcast

inline __m512 join(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(
      _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

// Block b of a weight row as 16 pairs of bf16 (values 2p, 2p + 1 in pair p), each value
// dequant_row's fp32 rounded to nearest even.
template <int WType>
inline __m512i block_pairs(const uint8_t* w, int64_t b) {
  __m256 q[4];
  float dw, offset;
  widen_block<WType>(w, b, q, dw, offset);
  const __m256 vd = _mm256_set1_ps(dw), voff = _mm256_set1_ps(offset);
  __m256 v[4];
  for (int i = 0; i < 4; ++i) {
    v[i] = WType == kQ4_0 ? _mm256_mul_ps(_mm256_sub_ps(q[i], _mm256_set1_ps(8.0f)), vd)
                          : _mm256_add_ps(_mm256_mul_ps(q[i], vd), voff);
  }
  // cvtne2ps: the second operand's 16 values are the low half of the result, in order.
  return (__m512i)_mm512_cvtne2ps_pbh(join(v[2], v[3]), join(v[0], v[1]));
}

// r[i] lane j -> r[j] lane i, 32-bit lanes.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// Weight rows [r0, r1) (at most 32) into panel [k / 2][32] pairs; columns past r1 zero.
template <int WType>
void pack_panel(const uint8_t* w, int64_t k, int64_t r0, int64_t r1, uint32_t* panel) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  for (int half = 0; half < 2; ++half) {
    const int64_t first = r0 + 16 * half;
    for (int64_t b = 0; b < nb; ++b) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = first + j < r1 ? block_pairs<WType>(w + (first + j) * row_bytes, b)
                              : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int p = 0; p < 16; ++p) {
        _mm512_storeu_si512(panel + (b * 16 + p) * kPanelCols + 16 * half, r[p]);
      }
    }
  }
}

// y[t][j] = x_t . w_j for MT bf16 rows of x (row stride ldxb) and the
// panel's columns j < nv.
template <int MT>
void panel_kernel(const uint16_t* xb, int64_t ldxb, const uint32_t* panel, int64_t pairs,
                  float* y, int64_t ldy, int nv) {
  __m512 a0[MT], a1[MT];
#pragma GCC unroll 12
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * kPanelCols);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * kPanelCols + 16);
#pragma GCC unroll 12
    for (int t = 0; t < MT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(xb + t * ldxb + 2 * p));
      a0[t] = _mm512_dpbf16_ps(a0[t], xv, w0);
      a1[t] = _mm512_dpbf16_ps(a1[t], xv, w1);
    }
  }
  const __mmask16 m0 = nv >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nv) - 1);
  const __mmask16 m1 = nv >= 32 ? (__mmask16)0xffff : nv > 16 ? (__mmask16)((1u << (nv - 16)) - 1) : 0;
#pragma GCC unroll 12
  for (int t = 0; t < MT; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, m0, a0[t]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, m1, a1[t]);
  }
}

template <int WType>
void gemm_bf16(const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb, int64_t m, float* y,
               int64_t ldy, int nthreads) {
  for_row_chunks(0, n, kPanelCols, nthreads, worth_threads(n, k, m, nthreads),
                 [&](int64_t r0, int64_t r1) {
    static thread_local std::vector<uint32_t> panel;
    if ((int64_t)panel.size() < k / 2 * kPanelCols) panel.resize(k / 2 * kPanelCols);
    pack_panel<WType>(w, k, r0, r1, panel.data());
    const int nv = (int)(r1 - r0);
    // Passes of at most kMaxRows rows, as even as they go (32 rows: 11 11 10).
    const int64_t passes = (m + kMaxRows - 1) / kMaxRows;
    const int64_t base = m / passes, extra = m % passes;
    for (int64_t p = 0, i = 0; p < passes; ++p) {
      const int64_t rows = base + (p < extra ? 1 : 0);
      const uint16_t* xi = xb + i * k;
      float* yi = y + i * ldy + r0;
      i += rows;
      switch (rows) {
        case 1: panel_kernel<1>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 2: panel_kernel<2>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 3: panel_kernel<3>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 4: panel_kernel<4>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 5: panel_kernel<5>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 6: panel_kernel<6>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 7: panel_kernel<7>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 8: panel_kernel<8>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 9: panel_kernel<9>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 10: panel_kernel<10>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        case 11: panel_kernel<11>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
        default: panel_kernel<12>(xi, k, panel.data(), k / 2, yi, ldy, nv); break;
      }
    }
  });
}

}  // namespace
#endif

extern "C" {

// Whether rs_gemm_bf16 runs here (the library was built for a CPU with AVX512-BF16).
int rs_has_bf16_gemm() {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

// y [m, n] (row stride ldy) = bf16(x) [m, k] (row stride ldx) @ bf16(W).T. 0 on success; 1 for
// a k that is not whole blocks, 2 for an unknown type, 3 without AVX512-BF16.
int rs_gemm_bf16(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                 int64_t ldx, float* y, int64_t ldy, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if (k % QK != 0 || nthreads < 1) return 1;
  if (block_bytes(wtype) == 0) return 2;
  static thread_local std::vector<uint16_t> xbuf;
  if ((int64_t)xbuf.size() < m * k) xbuf.resize(m * k);
  uint16_t* xb = xbuf.data();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && m * k >= (1 << 16))
  for (int64_t i = 0; i < m; ++i) fp32_to_bf16(x + i * ldx, k, xb + i * k);
  return with_wtype(wtype, [&](auto t) { gemm_bf16<decltype(t)::value>(w, n, k, xb, m, y, ldy, nthreads); });
#else
  (void)wtype, (void)w, (void)n, (void)k, (void)x, (void)m, (void)ldx, (void)y, (void)ldy,
      (void)nthreads;
  return 3;
#endif
}

}  // extern "C"
