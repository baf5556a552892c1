// The quantized GEMM with fp32 activations (see quant_gemm.cpp for the int8-activation one).
//
// Two kernels, one result (the fp32 product of the dequantized weights):
// - few rows (m <= kDirectRows): each weight block is widened to fp32 in registers and dotted
//   with every row. AVX-512: the block dequantized (q * d + offset, dequant_row's values),
//   then two FMAs a row, two weight rows at a time from 5 rows; AVX2 likewise from
//   kAvx2DequantRows rows (four FMAs a row); below that, and on the scalar build,
//   sum(W x) = d * sum(q x) + offset * sum(x), sum(x) of each activation block computed once
//   per call.
// - more rows: each thread dequantizes weight rows once, into a panel (AVX2, AVX-512: outer
//   products of activation rows x panel columns) or, on the scalar build, a tile of kTileRows
//   rows run through a micro-kernel of 3 activation rows x 4 weight rows; either way a weight
//   is unpacked once per call, not once per activation row.
// Rounding is fp32's alone, so results track a dequantize-then-matmul reference to ~1e-6.
#include <algorithm>
#include <vector>

#include <omp.h>

#include "panel_kernels.h"
#include "quant_blocks.h"

using namespace rs;

namespace {

// Up to here the register kernel wins (tools/bench_quant.py); with AVX-512 a widened block is
// two vectors, and 8 rows a block cost what 4 did (3072 x 576, 2 threads: 6 rows 0.18 ->
// 0.09 ms, 8 rows 0.22 -> 0.11 ms against the tiled kernel). With AVX2, 5 and 6 rows still
// fit its 16 registers and beat the tiled kernel by 5-20% (a speculative verify row's 1 + 5);
// at 8 they were even. With each block dequantized once and one accumulator a row from 6 rows
// (4 weight vectors + 12 accumulators: the 16 registers), the AVX2 kernel takes up to 12 rows
// (an AVX2 build on a Zen 4 VM, whose 256-bit units match Zen 3's two FMA pipes; 2 threads,
// 30 layers' Q4_1 weights, one process calling the builds in turn, against the old register
// kernel, the tiles and the panel kernel: 6 rows 13.1-14.1 -> 11.4-11.5 ms, 7 / 8 rows 21.9 /
// 22.2 -> 16.9 / 17.6, 9 / 10 rows 18.4-20.4 / 20.9-21.0 -> 15.6-17.1 / 17.2-17.4, 11 / 12
// rows 22.6-27.0 / 24.6-24.7 -> 19.3-22.5 / 21.4-22.1; 13 rows even).
// On Intel's cores with AMX (two 512-bit FMA ports, where AMD's Zen 4 has one 512-bit FMA a
// cycle) the register kernel beats the panel one up to 16 rows: a speculative verify step
// of 1 + k tokens (an Emerald Rapids VM, 2 threads, 30 layers' Q4_1 weights, the builds in
// turn: 9 / 10 / 12 rows 14.0 / 14.6 / 15.7 -> 9.6 / 11.0 / 12.2 ms, 13 / 14 / 16 rows
// 16.9 / 17.5 / 18.1 -> 14.3 / 14.3 / 15.9 ms, each less ~5 ms of calls from Python).
// On AMD's Zen 4 it wins up to 12 rows, where two weight rows' 24 accumulators still fit the
// 32 registers (2 threads, 30 layers' Q4_1 weights, one process calling the builds in turn:
// 9 / 10 / 12 rows 18.8 / 19.3 / 20.9 -> 14.1 / 15.8 / 18.4 ms against the panel kernel; the
// model's whole verify step of 9 / 10 / 12 tokens 34.4 / 29.5 / 31.4 -> 31.7 / 28.0 / 30.1
// ms). A bound of 16 there: 13 rows 22.3 -> 21.1 ms, but 16 rows 25.3 -> 26.6.
#if defined(__AVX512F__) && defined(__AMX_TILE__)
constexpr int64_t kDirectRows = 16;
#elif defined(__AVX512F__) || defined(__AVX2__)
constexpr int64_t kDirectRows = 12;
#else
constexpr int64_t kDirectRows = 6;
#endif
// From this many rows the AVX2 register kernel dequantizes each block once and runs four FMAs
// a row on it. Below, it scales each row's sum of q * x instead (two multiplies, three FMAs
// and an add a row, plus offset * sum(x)), which saves the dequantization where few rows
// share it (the builds in turn, as above: 1 and 2 rows as before, 3 even, 4 / 5 / 6 rows
// 10.1 / 11.0 / 13.3 -> 9.2 / 10.3 / 11.7 ms).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kAvx2DequantRows = 3;
#endif
constexpr int64_t kTileRows = 16;   // weight rows dequantized at a time by a thread

// ------------------------------------------------------------------ few rows: blocks in registers

template <int WType, int MT>
void dot_row_f32(const uint8_t* w, int64_t nb, const float* const* xs, const float* const* sums,
                 float* out) {
#if defined(__AVX512F__)
  // The block dequantized once (the panel kernels' values, dequant_row's), then two FMAs a
  // row, where scaling each row's sum of q * x cost a multiply, two FMAs and a scalar FMA a
  // row (2 threads, 30 layers' Q4_1 weights, one process taking turns with the old build:
  // 1 row 8.4-9.0 -> 7.5-7.9 ms with quant_blocks.h's table lookup, 6 rows 15.8 -> 14.3).
  // Two accumulators a row: a row's FMAs are two independent chains.
  (void)sums;
  __m512 acc0[MT], acc1[MT];
  for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo, hi;  // values 0-15, 16-31
    dequant_block16x2<WType>(w, b, lo, hi);
    for (int t = 0; t < MT; ++t) {
      const float* x = xs[t] + b * QK;
      acc0[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), acc0[t]);
      acc1[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), acc1[t]);
    }
  }
  for (int t = 0; t < MT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
#elif defined(__AVX2__)
  if constexpr (MT >= kAvx2DequantRows) {
    // The block dequantized once (dequant_row's values), then four FMAs a row, as the
    // AVX-512 branch does: two accumulators a row (two independent chains) below 6 rows.
    (void)sums;
    __m256 acc0[MT], acc1[MT];
    for (int t = 0; t < MT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m256 q[4];
      dequant_block8x4<WType>(w, b, q);
      for (int t = 0; t < MT; ++t) {
        const float* x = xs[t] + b * QK;
        // From 6 rows one chain a row (MT chains are enough, and fit): the odd vectors go
        // to the same accumulator.
        __m256& odd = MT >= 6 ? acc0[t] : acc1[t];
        acc0[t] = _mm256_fmadd_ps(q[0], _mm256_loadu_ps(x), acc0[t]);
        odd = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), odd);
        acc0[t] = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), acc0[t]);
        odd = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), odd);
      }
    }
    for (int t = 0; t < MT; ++t) {
      out[t] = hsum(MT >= 6 ? acc0[t] : _mm256_add_ps(acc0[t], acc1[t]));
    }
    return;
  }
  float extra[MT];  // offset * sum(x) over the blocks
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps(), extra[t] = 0.0f;
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
  float acc[MT], extra[MT];
  for (int t = 0; t < MT; ++t) acc[t] = extra[t] = 0.0f;
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

#if defined(__AVX512F__)
// dot_row_f32 for two weight rows at once: each row of x is loaded once for both, so a
// row of x costs 2 loads and 4 FMAs a pair of blocks instead of 4 and 4 (one accumulator a
// row and weight row: 2 * MT independent chains).
template <int WType, int MT>
void dot_rows2_f32(const uint8_t* w0, const uint8_t* w1, int64_t nb, const float* const* xs,
                   float* out0, float* out1) {
  __m512 a0[MT], a1[MT];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo0, hi0, lo1, hi1;
    dequant_block16x2<WType>(w0, b, lo0, hi0);
    dequant_block16x2<WType>(w1, b, lo1, hi1);
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      const float* x = xs[t] + b * QK;
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
      a0[t] = _mm512_fmadd_ps(hi0, x1, _mm512_fmadd_ps(lo0, x0, a0[t]));
      a1[t] = _mm512_fmadd_ps(hi1, x1, _mm512_fmadd_ps(lo1, x0, a1[t]));
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) {
    out0[t] = _mm512_reduce_add_ps(a0[t]);
    out1[t] = _mm512_reduce_add_ps(a1[t]);
  }
}
#endif

#if !defined(__AVX512F__)
// Each activation row's sum over each block ([m][nb]: sum(x) for the offset * sum(x) term),
// in this thread's buffer.
inline const float* activation_block_sums(const float* x, int64_t m, int64_t ldx, int64_t nb) {
  static thread_local std::vector<float> sums;
  if ((int64_t)sums.size() < m * nb) sums.resize(m * nb);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + i * ldx + b * QK;
      float s = 0.0f;
      for (int j = 0; j < QK; ++j) s += xb[j];
      sums[i * nb + b] = s;
    }
  }
  return sums.data();
}
#endif

// Output columns [r_begin, r_end) of y (weight rows); threads split them when nthreads > 1.
template <int WType>
void gemm_direct(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
                 float* y, int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
#if defined(__AVX512F__)
  const float* sums = nullptr;  // the AVX-512 kernels run on dequantized blocks: no sums of x
#elif defined(__AVX2__)
  // So do the AVX2 kernels from kAvx2DequantRows rows.
  const float* sums = m < kAvx2DequantRows ? activation_block_sums(x, m, ldx, nb) : nullptr;
#else
  const float* sums = activation_block_sums(x, m, ldx, nb);
#endif
  const float* xs[kDirectRows];
  const float* ss[kDirectRows];
  for (int t = 0; t < m; ++t) xs[t] = x + t * ldx, ss[t] = sums ? sums + t * nb : nullptr;
  for_row_chunks(r_begin, r_end, 16, nthreads, worth_threads(n, k, m, nthreads), [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    // Weight rows are asked for kAhead rows before they are read (the chunk's first ones at
    // once), so they stream in while earlier ones compute (30 layers' weights, one process
    // taking turns with the build before: 1 row 7.5-7.8 -> 7.1-7.3 ms, 6 rows 12.5-12.7 ->
    // 11.9-12.0; the whole chunk at once instead slowed the LM head's 612-byte rows by 10%).
    constexpr int64_t kAhead = 4;
    prefetch_bytes(w + r0 * row_bytes, std::min(kAhead, r1 - r0) * row_bytes);
    auto fetch_ahead = [&](int64_t r, int64_t rows) {
      const int64_t a = r + kAhead, b = std::min(r + kAhead + rows, r1);
      if (a < b) prefetch_bytes(w + a * row_bytes, (b - a) * row_bytes);
    };
#if defined(__AVX512F__)
    // From 5 rows (2 threads, 30 layers' own Q4_1 weights: 6 rows 14.3-14.7 -> 13.0-13.1 ms,
    // 8 rows 18.0-18.9 -> 14.9-15.2); below that, even or a little behind.
    for (; m >= 5 && r + 2 <= r1; r += 2) {
      fetch_ahead(r, 2);
      const uint8_t* wr = w + r * row_bytes;
      float o0[kDirectRows], o1[kDirectRows];
      with_rows<kDirectRows>((int)m, [&](auto rows) {
        dot_rows2_f32<WType, decltype(rows)::value>(wr, wr + row_bytes, nb, xs, o0, o1);
      });
      for (int t = 0; t < m; ++t) y[t * ldy + r] = o0[t], y[t * ldy + r + 1] = o1[t];
    }
#endif
    for (; r < r1; ++r) {
      fetch_ahead(r, 1);
      const uint8_t* wr = w + r * row_bytes;
      float out[kDirectRows];
      with_rows<kDirectRows>((int)m, [&](auto rows) {
        dot_row_f32<WType, decltype(rows)::value>(wr, nb, xs, ss, out);
      });
      for (int t = 0; t < m; ++t) y[t * ldy + r] = out[t];
    }
  });
}

// ------------------------------------------------------------------ many rows: dequantized tiles

// y[t][j] = x_t . w_j for MT activation rows and NT dequantized weight rows, each of length k:
// the scalar build's kernel past the register kernel's rows (vector builds run the panels).
template <int MT, int NT>
void micro_kernel(const float* x, int64_t ldx, const float* w, int64_t k, float* y, int64_t ldy) {
  for (int t = 0; t < MT; ++t) {
    for (int j = 0; j < NT; ++j) {
      float s = 0.0f;
      for (int64_t c = 0; c < k; ++c) s += x[t * ldx + c] * w[j * k + c];
      y[t * ldy + j] = s;
    }
  }
}

template <int MT>
inline void micro_kernel_cols(int nt, const float* x, int64_t ldx, const float* w, int64_t k,
                              float* y, int64_t ldy) {
  switch (nt) {
    case 1: micro_kernel<MT, 1>(x, ldx, w, k, y, ldy); break;
    case 2: micro_kernel<MT, 2>(x, ldx, w, k, y, ldy); break;
    case 3: micro_kernel<MT, 3>(x, ldx, w, k, y, ldy); break;
    default: micro_kernel<MT, 4>(x, ldx, w, k, y, ldy); break;
  }
}

// Weight rows [r0, r1) (at most kTileRows) dequantized into this thread's kTileRows x k tile,
// which stays in its L2 cache; the tile's rows past r1 - r0 zeroed when zero_rest.
template <int WType>
float* dequant_tile(const uint8_t* w, int64_t k, int64_t r0, int64_t r1, bool zero_rest) {
  static thread_local AlignedVector<float> tile;
  if ((int64_t)tile.size() < kTileRows * k) tile.resize(kTileRows * k);
  float* wt = tile.data();
  const int64_t row_bytes = k / QK * block_bytes(WType);
  for (int64_t r = r0; r < r1; ++r) dequant_row<WType>(w + r * row_bytes, k, wt + (r - r0) * k);
  if (zero_rest) {
    for (int64_t r = r1 - r0; r < kTileRows; ++r)
      for (int64_t c = 0; c < k; ++c) wt[r * k + c] = 0.0f;
  }
  return wt;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: the tile's 16 weight rows transposed into a panel [k][16], and an outer-product
// micro-kernel of MT activation rows x those 16 output columns (2 vectors): MT * 2
// accumulators, no horizontal sums, two panel loads and MT broadcasts a k step. The dot-product
// kernel below reached ~50% of the FMA rate from 8 to 32 rows (3072 x 576: 40 us a row on two
// threads); this one is what sgemm libraries do on AVX2.
constexpr int kPanelRows = 6;
// Against the dot-product tiles the panel won from 10 rows (3072 x 576, 2 threads, 8 rows
// 0.43 vs 0.57 ms, 12 rows 0.53 vs 0.45, 24 rows 1.04 vs 0.83, 256 rows 10.1 vs 6.6); the
// register kernel now takes the rows below 13 (kDirectRows), so it runs every step past them.

inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// y[t][0..nv) = x_t . w_j for MT rows t and the panel's columns j (nv <= 16 of them valid).
template <int MT>
void panel_kernel(const float* x, int64_t ldx, const float* panel, int64_t k, float* y,
                  int64_t ldy, int nv) {
  // Two 1-D accumulator arrays, loops unrolled: with acc[MT][2] GCC kept the accumulators in
  // memory, a store of each after every FMA.
  __m256 a0[MT], a1[MT];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; ++c) {
    const __m256 w0 = _mm256_loadu_ps(panel + c * 16), w1 = _mm256_loadu_ps(panel + c * 16 + 8);
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      const __m256 xb = _mm256_broadcast_ss(x + t * ldx + c);
      a0[t] = _mm256_fmadd_ps(xb, w0, a0[t]);
      a1[t] = _mm256_fmadd_ps(xb, w1, a1[t]);
    }
  }
  alignas(32) float tmp[MT][16];
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) {
    _mm256_store_ps(tmp[t], a0[t]);
    _mm256_store_ps(tmp[t] + 8, a1[t]);
  }
  for (int t = 0; t < MT; ++t)
    for (int j = 0; j < nv; ++j) y[t * ldy + j] = tmp[t][j];
}

template <int WType>
void gemm_panels(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
                 float* y, int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
  for_row_chunks(r_begin, r_end, kTileRows, nthreads, worth_threads(n, k, m, nthreads),
                 [&](int64_t r0, int64_t r1) {
    const float* wt = dequant_tile<WType>(w, k, r0, r1, true);
    static thread_local AlignedVector<float> panel;
    if ((int64_t)panel.size() < kTileRows * k) panel.resize(kTileRows * k);
    float* pn = panel.data();
    for (int64_t c = 0; c < k; c += 8) {  // k: whole blocks of 32
      transpose8(wt + c, k, pn + c * 16, 16);
      transpose8(wt + 8 * k + c, k, pn + c * 16 + 8, 16);
    }
    const int nv = (int)(r1 - r0);
    // Passes of at most kPanelRows rows, as even as they go (32 rows: 6 6 5 5 5 5, not five
    // of 6 and a 2-row pass at a third of the FMA rate).
    even_passes<kPanelRows>(m, [&](auto rows, int64_t i) {
      panel_kernel<decltype(rows)::value>(x + i * ldx, ldx, pn, k, y + i * ldy + r0, ldy, nv);
    });
  });
}
#endif

#if defined(__AVX512F__)
// AVX-512: 32 weight rows dequantized straight into a panel [k][32] (16 x 16 transposes of
// each block's two halves), and an outer-product micro-kernel of up to 12 activation rows x
// those 32 columns: 24 accumulators, two panel loads and one broadcast per row a k step (the
// layout of quant_gemm_bf16.cpp's kernel, with fp32 FMAs). Against the dot-product tiles'
// horizontal sums and dequantize + oneDNN's reordered weight (quant_layers.py), it runs
// every step past the register kernel's rows (kDirectRows).
constexpr int kPanelCols512 = kPanelWidth;
constexpr int kPanelRows512 = 12;

// Rows [r1, ahead) are the next panels' (prefetched while this one packs).
template <int WType>
void pack_panel_f32(const uint8_t* w, int64_t k, int64_t r0, int64_t r1, float* panel,
                    int64_t ahead) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  prefetch_bytes(w + r0 * row_bytes, (r1 - r0) * row_bytes);
  if (ahead > r1) prefetch_bytes(w + r1 * row_bytes, (ahead - r1) * row_bytes);
  for (int half = 0; half < 2; ++half) {
    const int64_t first = r0 + 16 * half;
    for (int64_t b = 0; b < nb; ++b) {
      __m512i lo[16], hi[16];
      for (int j = 0; j < 16; ++j) {
        __m512 l = _mm512_setzero_ps(), h = _mm512_setzero_ps();
        if (first + j < r1) dequant_block16x2<WType>(w + (first + j) * row_bytes, b, l, h);
        lo[j] = _mm512_castps_si512(l), hi[j] = _mm512_castps_si512(h);
      }
      transpose16x16(lo);
      transpose16x16(hi);
      float* dst = panel + b * QK * kPanelCols512 + 16 * half;
      for (int i = 0; i < 16; ++i) {
        _mm512_storeu_si512(dst + i * kPanelCols512, lo[i]);
        _mm512_storeu_si512(dst + (16 + i) * kPanelCols512, hi[i]);
      }
    }
  }
}

template <int WType>
void gemm_panels_512(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                     int64_t ldx, float* y, int64_t ldy, int nthreads, int64_t r_begin,
                     int64_t r_end) {
  const bool parallel = worth_threads(n, k, m, nthreads);
  for_row_chunks(r_begin, r_end, kPanelCols512, nthreads, parallel, [&](int64_t r0, int64_t r1) {
    static thread_local AlignedVector<float> panel;
    if ((int64_t)panel.size() < k * kPanelCols512) panel.resize(k * kPanelCols512);
    float* pn = panel.data();
    const int64_t ahead = r1 + kPanelCols512 * (parallel ? nthreads : 1);
    pack_panel_f32<WType>(w, k, r0, r1, pn, ahead < r_end ? ahead : r_end);
    const int nv = (int)(r1 - r0);
    even_passes<kPanelRows512>(m, [&](auto rows, int64_t i) {
      panel_f32<decltype(rows)::value>(x + i * ldx, ldx, pn, k, y + i * ldy + r0, ldy, nv);
    });
  });
}
#endif

template <int WType>
void gemm_tiled(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
                float* y, int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
  for_row_chunks(r_begin, r_end, kTileRows, nthreads, worth_threads(n, k, m, nthreads),
                 [&](int64_t r0, int64_t r1) {
    const float* wt = dequant_tile<WType>(w, k, r0, r1, false);
    for (int64_t i = 0; i < m; i += 3) {
      const int mt = (int)(m - i < 3 ? m - i : 3);
      for (int64_t j = r0; j < r1; j += 4) {
        const int nt = (int)(r1 - j < 4 ? r1 - j : 4);
        const float* xi = x + i * ldx;
        const float* wj = wt + (j - r0) * k;
        float* yij = y + i * ldy + j;
        switch (mt) {
          case 1: micro_kernel_cols<1>(nt, xi, ldx, wj, k, yij, ldy); break;
          case 2: micro_kernel_cols<2>(nt, xi, ldx, wj, k, yij, ldy); break;
          default: micro_kernel_cols<3>(nt, xi, ldx, wj, k, yij, ldy); break;
        }
      }
    }
  });
}

template <int WType>
void gemm_f32(const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m, int64_t ldx,
              float* y, int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
  if (m <= kDirectRows) {
    gemm_direct<WType>(w, n, k, x, m, ldx, y, ldy, nthreads, r_begin, r_end);
    return;
  }
#if defined(__AVX512F__)
  gemm_panels_512<WType>(w, n, k, x, m, ldx, y, ldy, nthreads, r_begin, r_end);
#elif defined(__AVX2__)
  gemm_panels<WType>(w, n, k, x, m, ldx, y, ldy, nthreads, r_begin, r_end);
#else
  gemm_tiled<WType>(w, n, k, x, m, ldx, y, ldy, nthreads, r_begin, r_end);
#endif
}

}  // namespace

extern "C" {

// rs_gemm with the activations kept in fp32 (no int8 rounding). 0 on success.
int rs_gemm_f32(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                int64_t ldx, float* y, int64_t ldy, int nthreads) {
  if (k % QK != 0 || nthreads < 1) return 1;
  return with_wtype(wtype, [&](auto t) { gemm_f32<decltype(t)::value>(w, n, k, x, m, ldx, y, ldy, nthreads, 0, n); });
}

// The same product's output columns [r_begin, r_end) only, on the calling thread: for a
// caller that splits the columns over the threads of its own parallel region (model_step.cpp).
int rs_gemm_f32_cols(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                     int64_t ldx, float* y, int64_t ldy, int64_t r_begin, int64_t r_end) {
  if (k % QK != 0 || r_begin < 0 || r_end > n) return 1;
  return with_wtype(wtype, [&](auto t) {
    gemm_f32<decltype(t)::value>(w, n, k, x, m, ldx, y, ldy, 1, r_begin, r_end);
  });
}

}  // extern "C"
