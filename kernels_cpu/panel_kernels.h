// The outer-product micro-kernels of the panel GEMMs, shared by the quantized GEMMs and the
// prefill attention's scores: MT rows of x times a panel of 32 columns laid out [k][32] (fp32)
// or [k / 2][32] pairs of bf16, 2 * MT accumulators, one broadcast of x a row and two panel
// loads a k step; y's first nv columns of each row written.
#pragma once
#include <cstdint>
#include <cstring>

#include "quant_blocks.h"

namespace rs {

constexpr int kPanelWidth = 32;  // columns of a panel: two 16-lane vectors

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
// Whether the bf16 products run on AMX tiles here (quant_gemm_bf16.cpp: a build for a CPU
// with AMX-BF16, the tile state granted, and the path not switched off by rs_bf16_amx).
bool amx_usable();
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The calling thread's tiles: eight of 16 rows x 64 bytes (the AMX GEMMs' and the prefill
// attention's shape).
inline void load_tile_config() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}
#endif

#if defined(__AVX512F__)
// The accumulators of MT rows (columns 0-15 in a0, 16-31 in a1) into y's first nv columns.
template <int MT>
inline void store_panel(const __m512* a0, const __m512* a1, float* y, int64_t ldy, int nv) {
  const __mmask16 m0 = first_lanes(nv), m1 = first_lanes(nv - 16);
#pragma GCC unroll 12
  for (int t = 0; t < MT; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, m0, a0[t]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, m1, a1[t]);
  }
}

// y[t][j] = x_t . panel column j, x fp32 (row stride ldx), k steps.
template <int MT>
void panel_f32(const float* x, int64_t ldx, const float* panel, int64_t k, float* y, int64_t ldy,
               int nv) {
  __m512 a0[MT], a1[MT];
#pragma GCC unroll 12
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; ++c) {
    const __m512 w0 = _mm512_loadu_ps(panel + c * kPanelWidth);
    const __m512 w1 = _mm512_loadu_ps(panel + c * kPanelWidth + 16);
#pragma GCC unroll 12
    for (int t = 0; t < MT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + c]);
      a0[t] = _mm512_fmadd_ps(xb, w0, a0[t]);
      a1[t] = _mm512_fmadd_ps(xb, w1, a1[t]);
    }
  }
  store_panel<MT>(a0, a1, y, ldy, nv);
}
#endif

#if defined(__AVX512BF16__)
// y[t][j] = x_t . panel column j in bf16 (vdpbf16ps, fp32 sums): x bf16 (row stride ldxb
// values), pairs = k / 2 steps. pf (optional): bytes to bring into L2 meanwhile, pf_lines
// 64-byte lines a step from there (what streams from memory next, spread over the steps
// rather than asked for at once).
template <int MT>
void panel_bf16(const uint16_t* xb, int64_t ldxb, const uint32_t* panel, int64_t pairs, float* y,
                int64_t ldy, int nv, const char* pf = nullptr, int pf_lines = 0) {
  __m512 a0[MT], a1[MT];
#pragma GCC unroll 12
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int l = 0; l < pf_lines; ++l) _mm_prefetch(pf + (p * pf_lines + l) * 64, _MM_HINT_T1);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * kPanelWidth);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * kPanelWidth + 16);
#pragma GCC unroll 12
    for (int t = 0; t < MT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(xb + t * ldxb + 2 * p));
      a0[t] = _mm512_dpbf16_ps(a0[t], xv, w0);
      a1[t] = _mm512_dpbf16_ps(a1[t], xv, w1);
    }
  }
  store_panel<MT>(a0, a1, y, ldy, nv);
}
#endif

}  // namespace rs
